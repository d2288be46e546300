"""What a run reports besides metrics.jsonl: plots of the curves, TensorBoard and W&B."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mllmjax.errors import BadInputError
from mllmjax.grpo.config import GRPOConfig

PLOTS = {
    "reward": ("reward", "reward (weighted mean)"),
    "accuracy": ("accuracy", "accuracy (train samples)"),
    "kl": ("kl", "KL to the reference"),
    "entropy": ("entropy", "entropy (nats / token)"),
    "length": ("completion_len", "completion length (tokens)"),
}


def draw_plots(run_dir: Path, metrics: Sequence[dict[str, Any]]) -> list[Path]:
    """PNG curves of reward, accuracy (with held-out eval accuracy when present), KL, entropy and length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, (key, title) in PLOTS.items():
        pts = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key)
        if name == "accuracy":
            ev = [(m["step"], m["eval/accuracy"]) for m in metrics if m.get("eval/accuracy") is not None]
            if ev:
                xs, ys = zip(*ev, strict=True)
                ax.plot(xs, ys, marker="o", label="held-out (greedy)")
            ax.legend(loc="best")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


class _TensorBoard:
    @staticmethod
    def check() -> None:
        try:
            import tensorboard  # noqa: F401
        except ImportError as e:
            raise BadInputError(
                "--report-to tensorboard needs the tensorboard package: pip install 'mllmjax[tensorboard]'"
            ) from e

    def __init__(self, run_dir: Path, cfg: GRPOConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, row: dict[str, Any], step: int) -> None:
        for k, v in row.items():
            if isinstance(v, int | float) and k != "step":
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    @staticmethod
    def check() -> None:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise BadInputError(
                "--report-to wandb needs the wandb package: pip install 'mllmjax[wandb]'"
            ) from e

    def __init__(self, run_dir: Path, cfg: GRPOConfig):
        import wandb

        self.run = wandb.init(project="mllmjax", name=run_dir.name, dir=str(run_dir), config=cfg.to_dict())

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=step)

    def close(self) -> None:
        self.run.finish()


REPORTERS: dict[str, Any] = {"tensorboard": _TensorBoard, "wandb": _WandB}


def make_reporter(name: str, run_dir: Path, cfg: GRPOConfig) -> Any:
    return REPORTERS[name](run_dir, cfg)
