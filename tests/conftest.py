import os

import torch

# Without a GPU, Triton kernels run in its interpreter, which must be chosen before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# auto by measurement picks by timing, which tests must not depend on: they run the priority order
# (tests/test_autotune.py turns measurement on, with a fake timer), and write no autotune file.
os.environ.setdefault("TOKENFLOW_AUTOTUNE", "0")
os.environ.setdefault("TOKENFLOW_AUTOTUNE_CACHE", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def clip():
    """10 random 64x64 frames (uint8 [N, 3, H, W]) with some structure, so features differ across tokens."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8)
    frames = torch.stack([torch.roll(base, shifts=(i, 2 * i), dims=(1, 2)) for i in range(10)])
    return frames


@pytest.fixture
def tiny_cfg(tmp_path):
    from tokenflow.config import EditConfig
    # resume=False: tests edit one inversion repeatedly and count UNet calls (the checkpoint tests turn it on)
    return EditConfig(prompt="a red car", model="tiny-random", batch_size=4, n_inversion_steps=10, n_timesteps=5,
                      cache_dir=str(tmp_path / "cache"), resume=False)


@pytest.fixture(scope="session")
def tiny_editor():
    from tokenflow.editor import TokenFlowEditor
    from tokenflow.models import load_models
    return TokenFlowEditor(load_models("tiny-random", device=torch.device("cpu"), dtype=torch.float32))


class CallCounter:
    """Counts forward calls of a module."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def close(self):
        self.handle.remove()


# Measured: edits that differ only in how sums are grouped (frames per UNet call, keyframes per chunk)
# end 20-30 units of float32 precision apart at the latents' scale after 5 steps of the tiny model.
REGROUPING_ULPS = 256


def assert_latents_match(a: torch.Tensor, b: torch.Tensor, ulps: int = REGROUPING_ULPS) -> None:
    """Latents of two computations that are the same up to the grouping of sums agree to `ulps` units of
    the dtype's precision at their scale; a real difference (another keyframe, a wrong blend) is orders
    of magnitude larger."""
    tol = ulps * torch.finfo(a.dtype).eps * float(torch.maximum(a.abs().max(), b.abs().max()))
    diff = float((a - b).abs().max())
    assert diff <= tol, f"latents differ by {diff:.3g} (tolerance {tol:.3g}: {ulps} ulps at their scale)"


def pass_kind(editor) -> str:
    """The kind of UNet call running now (off outside an edit): for hooks that spy on the editing loop."""
    return editor.hooks.state.kind if editor.hooks is not None else "off"


@pytest.fixture
def unet_calls(tiny_editor):
    c = CallCounter(tiny_editor.models.unet)
    yield c
    c.close()
