import pytest


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, bunny_frames):
    """One real clip: 6 frames of bigbuckbunny, a 192x192 crop, as PNGs."""
    from sdatc.data.video import write_frames

    root = tmp_path_factory.mktemp("train_data")
    write_frames(root / "bunny", bunny_frames[:, 200:392, 500:692])
    return root


class OptimizerSpy:
    """Every AdamW built while it is installed (``torch.optim.AdamW`` replaced by a recording subclass)."""

    def __init__(self, monkeypatch):
        import torch

        real, made = torch.optim.AdamW, []

        class RecordingAdamW(real):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made.append(self)

        self.made = made
        monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)

    def param_dtypes(self) -> set[str]:
        return {str(p.dtype).removeprefix("torch.") for o in self.made for g in o.param_groups for p in g["params"]}


@pytest.fixture(scope="session")
def spy_optimizers():
    """``spy = spy_optimizers(monkeypatch)``: records the AdamW optimisers a run builds."""
    return OptimizerSpy
