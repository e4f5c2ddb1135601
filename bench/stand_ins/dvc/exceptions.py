class NotDvcRepoError(Exception):
    pass
