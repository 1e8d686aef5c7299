"""``Training.torch_compile``: the decoder layers compiled with ``torch.compile``, in place.

``nn.Module.compile`` compiles a module's forward without wrapping it, so parameter names, state
dicts, saved adapters and resume checkpoints are exactly those of an eager job. Dynamo inlines
``nn.Module`` calls, so one compiled graph serves every layer of the stack (the compile cost is
paid once, not per layer). Shapes are compiled as dynamic: batches differ in length, and a static
graph would recompile for every new length. The lm-head and the loss stay eager: the chunked
cross-entropy (training/loss.py) already runs only the GEMMs it needs.

Whether it pays depends on the device and the job's length (README, "GPU"): compilation takes
tens of seconds before the first step, and on the CPU the compiled step was not faster.
"""

from __future__ import annotations

from torch import nn

from ..adapters.autocast import COMPILED_ATTR
from ..errors import InvalidConfigurationError
from .loss import causal_lm_of


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile each decoder layer of ``model`` (a PeftModel or a ``*ForCausalLM``) in place.

    Returns:
        The number of layers compiled.

    Raises:
        InvalidConfigurationError: the model's decoder has no ``layers`` list to compile.
    """
    layers = getattr(causal_lm_of(model).get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise InvalidConfigurationError(
            "`Training.torch_compile`: this model's decoder has no `layers` list to compile; train with it off",
            param="Training.torch_compile",
        )
    for layer in layers:
        layer.compile(dynamic=True)
    setattr(causal_lm_of(model).get_decoder(), COMPILED_ATTR, True)  # no eager-only weight casts
    return len(layers)
