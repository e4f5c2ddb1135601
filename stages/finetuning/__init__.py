"""What only the finetune stage uses: how its processes start, and the checks that keep a bad run from saving."""
