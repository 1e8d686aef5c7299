"""The job's device: which one, how the events name it, and how a batch gets there.

``Training.device`` "auto" takes the first CUDA GPU when torch sees one and the CPU otherwise;
"cuda" with no GPU fails the job naming the field (the API refuses it earlier, ``devices.py``, but a
job may be resumed after the GPU went away, or run by ``sqft train`` directly). Merge and sparsify
take the GPU when the model fits in it (:func:`operation_device`), and so do evaluate jobs and the
inference engine (in bf16 there).
"""

from __future__ import annotations

import os

import torch

from ..devices import cuda_refused
from .loss import label_positions

MAX_MASK_BYTES = 64 * 2**20  # a 4-D bool mask of up to 8 rows of 2,896 tokens


def resolve_device(requested: str, param: str = "Training.device") -> torch.device:
    """The ``torch.device`` for ``Training.device`` ("cpu", "cuda" or "auto").

    Raises:
        InvalidConfigurationError: "cuda" and ``torch.cuda.is_available()`` is false.
    """
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if requested == "cuda":
        raise cuda_refused("no CUDA GPU is available to this job (torch.cuda.is_available() is false)", param)
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """One line for the job's events: the device, and for a GPU its name and memory."""
    if device.type != "cuda":
        return f"device cpu ({torch.get_num_threads()} intra-op thread(s))"
    props = torch.cuda.get_device_properties(device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # which of the machine's GPUs cuda:0... are
    return (
        f"device {device} {props.name} ({props.total_memory / 2**30:.1f} GiB, compute capability "
        f"{props.major}.{props.minor}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        + (f", CUDA_VISIBLE_DEVICES={visible})" if visible else ")")
    )


def attention_mask_4d(attention_mask: torch.Tensor) -> torch.Tensor:
    """The mask to give a GPU forward: a boolean ``[batch, 1, seq, seq]`` SDPA mask built on the host.

    From a 2-D mask, transformers builds this itself and on the way asks the device whether the batch
    has padding (``mask.all()``), or, with no mask, whether its positions are packed: either is a host
    sync in every forward. A prepared 4-D mask is used as it is. Causal, and a key is visible when it
    is a real token; a padding query also sees itself, so no row is empty (an all-masked row makes
    SDPA return NaN, which would reach the adapters' gradients through ``NaN * 0``). Padding rows take
    no loss and no real token sees them, so what they see changes nothing. A batch without padding
    gets one ``[1, 1, seq, seq]`` causal mask, broadcast. A mask over ``MAX_MASK_BYTES`` (long rows)
    stays 2-D: its copy would cost more than the sync.
    """
    batch, seq = attention_mask.shape
    causal = torch.ones(seq, seq, dtype=torch.bool).tril_()
    if bool(attention_mask.all()):
        return causal[None, None]
    if batch * seq * seq > MAX_MASK_BYTES:
        return attention_mask
    visible = attention_mask.bool()[:, None, None, :] | torch.eye(seq, dtype=torch.bool)
    return causal & visible


def packed_mask_4d(position_ids: torch.Tensor) -> torch.Tensor | None:
    """The block-diagonal causal mask of a packed batch (training/packing.py), built on the host.

    Without a mask, transformers finds the packed examples' boundaries in ``position_ids`` on the
    device, which reads the result back to the host in every forward. An example starts where its
    position is 0; a token sees the earlier tokens of its own example only. ``None`` (let the model
    build it) when the mask would exceed ``MAX_MASK_BYTES``.
    """
    batch, seq = position_ids.shape
    if batch * seq * seq > MAX_MASK_BYTES:
        return None
    segment = (position_ids == 0).cumsum(dim=1)
    same = segment[:, None, :, None] == segment[:, None, None, :]
    return same & torch.ones(seq, seq, dtype=torch.bool).tril_()


def device_batch(batch: dict, device: torch.device) -> dict:
    """A collated batch as a GPU step takes it: everything that depends on its values found on the host.

    Its label positions (:func:`~sqft_service.training.loss.label_positions`) and its 4-D attention
    mask (:func:`attention_mask_4d`, or :func:`packed_mask_4d` for a packed batch) are computed here,
    then the tensors are copied asynchronously from pinned memory (:func:`move_batch`). With nothing
    left to read back, the step never waits for the GPU, and the host collates and queues the next
    step's copies while the GPU computes this one. ``tests/unit/test_device.py`` runs such batches on
    the CPU and fails on any operator that would read a device value back.
    """
    batch = label_positions(batch)
    if "position_ids" in batch:  # packed: no 2-D mask, the examples' blocks instead
        batch["attention_mask"] = packed_mask_4d(batch["position_ids"])
    elif "token_type_ids" not in batch.get("media", {}):
        # (Gemma 3 builds its image blocks into the mask from the 2-D one: it would read a 4-D one as final.)
        batch["attention_mask"] = attention_mask_4d(batch["attention_mask"])
    return move_batch(batch, device)


def move_batch(batch: dict, device: torch.device) -> dict:
    """``batch`` with its tensors on ``device``: pinned and copied asynchronously to a GPU.

    ``non_blocking`` from pinned memory lets the copy overlap the previous step's kernels; on the CPU
    the batch is returned as it is (no copy, no overhead).
    """
    if device.type == "cpu":
        return batch
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.pin_memory().to(device, non_blocking=True)
        elif isinstance(value, dict):  # a batch's image inputs (training/images.py)
            value = move_batch(value, device)
        moved[key] = value
    return moved


def operation_device(model: torch.nn.Module, headroom: float = 1.25, dtype: torch.dtype | None = None) -> torch.device:
    """Where a one-off operation (merge, sparsify, evaluate, inference) on ``model`` runs: the GPU when
    it has room, else the CPU.

    An operation has no ``Training.device``; it takes the GPU when there is one and the model (with
    ``headroom`` for activations and temporaries; in ``dtype`` when it will be cast to it there) fits
    in its free memory, so a model too big for the card is still served, merged or pruned, more slowly,
    on the host.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    size = (lambda p: dtype.itemsize) if dtype is not None else (lambda p: p.element_size())
    need = sum(p.numel() * size(p) for p in model.parameters()) * headroom
    free, _ = torch.cuda.mem_get_info()
    return torch.device("cuda", torch.cuda.current_device()) if need <= free else torch.device("cpu")


def gpu_inference_dtype() -> torch.dtype:
    """What a model is served in on the GPU: bf16 where the card runs it natively, else fp16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s weights are (a PeftModel's too)."""
    return next(model.parameters()).device
