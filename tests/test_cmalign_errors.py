"""Bad input to the CMAlign entry points: clear errors that name the argument, the expected and the received."""
import pytest
import torch

import reid_kernels
from reid_kernels.nn import CMAlign

pytestmark = pytest.mark.skipif(not reid_kernels.extension_available(), reason="reid_kernels._C not built")


def _feat(*shape, **kwargs):
    return torch.randn(*shape, **kwargs)


def _pairs(batch):
    return torch.arange(batch).roll(1), torch.arange(batch).roll(2)


def _raises(exc, *fragments):
    """pytest.raises that also checks every fragment appears in the message."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(exc)
            self._info = self._ctx.__enter__()
            return self._info

        def __exit__(self, *args):
            suppressed = self._ctx.__exit__(*args)
            message = str(self._info.value)
            for fragment in fragments:
                assert fragment in message, f"{fragment!r} not in {message!r}"
            return suppressed

    return _Check()


# ---- rank, dtype, emptiness ----------------------------------------------


@pytest.mark.parametrize("fn", ["person_mask", "cmalign"])
def test_wrong_rank(fn):
    feat = _feat(4, 8, 6)
    call = (lambda: reid_kernels.person_mask(feat)) if fn == "person_mask" else (
        lambda: reid_kernels.cmalign(feat, *_pairs(4))
    )
    with _raises(ValueError, "feat", "4-D", "(4, 8, 6)"):
        call()


def test_soft_warp_wrong_rank_names_argument():
    q = _feat(2, 4, 3, 3)
    with _raises(ValueError, "key", "4-D", "(2, 4, 9)"):
        reid_kernels.soft_warp(q, _feat(2, 4, 9))
    with _raises(ValueError, "value", "4-D"):
        reid_kernels.soft_warp(q, q, _feat(2, 4))
    with _raises(ValueError, "query", "4-D"):
        reid_kernels.soft_warp(_feat(4, 3, 3), q)


def test_non_floating_dtype():
    with _raises(TypeError, "feat", "dtype", "torch.int64"):
        reid_kernels.person_mask(torch.ones(2, 3, 4, 4, dtype=torch.long))
    q = _feat(2, 4, 3, 3)
    with _raises(TypeError, "key", "torch.float64", "like query"):
        reid_kernels.soft_warp(q, q.double())


def test_empty_batch():
    with _raises(ValueError, "feat", "non-empty", "(0, 8, 4, 4)"):
        reid_kernels.cmalign(_feat(0, 8, 4, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with _raises(ValueError, "query", "non-empty"):
        reid_kernels.soft_warp(_feat(0, 4, 3, 3), _feat(0, 4, 3, 3))
    with _raises(ValueError, "key", "non-empty"):
        reid_kernels.soft_warp(_feat(2, 4, 3, 3), _feat(2, 4, 0, 3))


# ---- shapes ------------------------------------------------------------------


def test_soft_warp_mismatched_shapes():
    q = _feat(2, 4, 3, 3)
    with _raises(ValueError, "key", "4 channels", "got 5"):
        reid_kernels.soft_warp(q, _feat(2, 5, 3, 3))
    with _raises(ValueError, "key", "batch size 2", "got 3"):
        reid_kernels.soft_warp(q, _feat(3, 4, 3, 3))
    with _raises(ValueError, "value", "batch size 2", "got 1"):
        reid_kernels.soft_warp(q, q, _feat(1, 4, 3, 3))
    with _raises(ValueError, "value", "spatial size (2, 5)", "got (3, 3)"):
        reid_kernels.soft_warp(q, _feat(2, 4, 2, 5), _feat(2, 7, 3, 3))


# ---- partner indices ---------------------------------------------------------


def test_index_out_of_range():
    feat = _feat(4, 8, 3, 3)
    pos, neg = _pairs(4)
    with _raises(IndexError, "pos_idx", "[0, 4)", "got 4"):
        reid_kernels.cmalign(feat, torch.tensor([0, 1, 2, 4]), neg)
    with _raises(IndexError, "neg_idx", "[0, 4)", "got -1"):
        reid_kernels.cmalign(feat, pos, torch.tensor([0, -1, 2, 3]))


def test_index_wrong_dtype_or_shape():
    feat = _feat(4, 8, 3, 3)
    pos, neg = _pairs(4)
    with _raises(TypeError, "pos_idx", "int64", "torch.float32"):
        reid_kernels.cmalign(feat, pos.float(), neg)
    with _raises(TypeError, "neg_idx", "torch.Tensor", "list"):
        reid_kernels.cmalign(feat, pos, [0, 1, 2, 3])
    with _raises(ValueError, "pos_idx", "(4,)", "(3,)"):
        reid_kernels.cmalign(feat, pos[:3], neg)
    with _raises(ValueError, "neg_idx", "(4,)", "(2, 2)"):
        reid_kernels.cmalign(feat, pos, neg.view(2, 2))


# ---- scalars -----------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_temperature(temperature):
    feat = _feat(4, 8, 3, 3)
    with _raises(ValueError, "temperature", "> 0"):
        reid_kernels.cmalign(feat, *_pairs(4), temperature=temperature)
    with _raises(ValueError, "temperature", "> 0"):
        reid_kernels.soft_warp(feat, feat, temperature=temperature)
    with _raises(ValueError, "temperature", "> 0"):
        CMAlign(temperature=temperature)


def test_bad_scalar_types():
    feat = _feat(4, 8, 3, 3)
    with _raises(TypeError, "temperature", "str"):
        reid_kernels.soft_warp(feat, feat, temperature="50")
    with _raises(TypeError, "temperature", "bool"):
        reid_kernels.cmalign(feat, *_pairs(4), temperature=True)
    with _raises(ValueError, "margin", "finite", "nan"):
        reid_kernels.cmalign(feat, *_pairs(4), margin=float("nan"))


def test_kernel_checks_direct_calls():
    """The operators check their own inputs too (for callers that bypass the wrappers)."""
    q = torch.randn(2, 4, 6)
    with _raises(RuntimeError, "temperature", "> 0"):
        torch.ops.reid_kernels.soft_warp_fwd(q, q, q, -1.0)
    with _raises(RuntimeError, "key", "contiguous"):
        torch.ops.reid_kernels.soft_warp_fwd(q, q.transpose(1, 2).contiguous().transpose(1, 2), q, 1.0)
    with _raises(RuntimeError, "value", "(2, Cv, 6)"):
        torch.ops.reid_kernels.soft_warp_fwd(q, q, torch.randn(2, 4, 5), 1.0)
    with _raises(RuntimeError, "feat", "3-D"):
        torch.ops.reid_kernels.person_mask(torch.randn(2, 4))
    out, _, probs = torch.ops.reid_kernels.soft_warp_fwd(q, q, q, 1.0)
    with _raises(RuntimeError, "probs", "(2, 6, 6)"):
        torch.ops.reid_kernels.soft_warp_bwd(out, q, q, q, out, probs[:, :3].contiguous(), 1.0)
    with _raises(RuntimeError, "probs", "Float"):
        torch.ops.reid_kernels.soft_warp_bwd(out, q, q, q, out, probs.double(), 1.0)


# ---- devices -----------------------------------------------------------------


def test_different_devices():
    cpu = _feat(2, 4, 3, 3)
    meta = torch.empty(2, 4, 3, 3, device="meta")
    with _raises(ValueError, "key", "cpu", "meta"):
        reid_kernels.soft_warp(cpu, meta)
    with _raises(ValueError, "value", "cpu", "meta"):
        reid_kernels.soft_warp(cpu, cpu, meta)


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or reid_kernels.has_cuda_kernels(),
    reason="needs a GPU and a build without the CUDA kernels",
)
def test_cuda_tensor_without_cuda_kernels():
    feat = _feat(4, 8, 3, 3, device="cuda")
    with _raises(RuntimeError, "feat", "without CUDA"):
        reid_kernels.cmalign(feat, *_pairs(4))
    with _raises(RuntimeError, "query", "without CUDA"):
        reid_kernels.soft_warp(feat, feat)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_and_cpu_mixed():
    with _raises(ValueError, "key", "cuda", "cpu"):
        reid_kernels.soft_warp(_feat(2, 4, 3, 3, device="cuda"), _feat(2, 4, 3, 3))


# ---- module ------------------------------------------------------------------


def test_module_errors():
    module = CMAlign(num_pos=2)
    fv, ft = _feat(4, 8, 3, 3), _feat(4, 8, 3, 3)
    with _raises(ValueError, "feat_t", "(4, 8, 3, 3)", "(4, 8, 3, 2)"):
        module(fv, _feat(4, 8, 3, 2))
    with _raises(ValueError, "neg_idx", "pos_idx", "both or neither"):
        module(fv, ft, pos_idx=torch.arange(8))
    with _raises(ValueError, "feat_v", "num_pos = 3", "got 4"):
        module(fv, ft, num_pos=3)
    with _raises(ValueError, "num_pos", ">= 1", "got 0"):
        CMAlign(num_pos=0)
    with _raises(TypeError, "num_pos", "int", "float"):
        CMAlign(num_pos=2.0)
