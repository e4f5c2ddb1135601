import json
import shutil
from pathlib import Path


def get_dvc_repo():
    return None


class Live:
    def __init__(self, dir: str = "dvclive", **_: object) -> None:
        self.dir = Path(dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.step, self.summary = 0, {}

    def log_metric(self, name: str, value: float) -> None:
        *folders, leaf = name.split("/")
        node = self.summary
        for folder in folders:
            node = node.setdefault(folder, {})
        node[leaf] = value
        path = self.dir / "plots" / "metrics" / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a") as out:
            out.write(f"step\t{leaf}\n" * new + f"{self.step}\t{value}\n")

    def next_step(self) -> None:
        self._write()

    def end(self) -> None:
        self._write()

    def _write(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "metrics.json").write_text(json.dumps(self.summary | {"step": self.step}, indent=4))
