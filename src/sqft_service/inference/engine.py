"""The embedded engine: one worker thread runs every load and generation, one request at a time.

* torch, transformers and peft are imported in that thread when the first request arrives, so the API
  process starts (and stays, until then) torch-free, and the event loop never waits on a model.
* Each base model is loaded once, keyed by its resolved directory (a GGUF file goes through the same
  conversion cache as the jobs), least recently used evicted beyond ``max_models``. A fine-tuned
  adapter is attached to its base with stock peft (``PeftModel.from_pretrained``, then
  ``load_adapter``) and chosen per request with ``set_adapter``; base requests run inside
  ``disable_adapter()``. A merged model is a base of its own.
* A SparsePEFT adapter (trained as ``W + M*(BA)``, ``adapters/sparse``) is not attached: stock peft would
  add the unmasked ``BA``. It is served as a model of its own, a fresh copy of the base with the masked
  update merged in (``adapters.merge.masked_merge``): the same weights the trained model computed with
  in eval mode, the base's zeros kept, the base's speed (attaching it masked would rebuild the dense
  ``W + M*(BA)`` of every layer at every decoding step). The price is memory, one model per such
  adapter, bounded like the others by ``max_models``.
* Sharing the machine with training: the engine uses ``threads`` torch threads (``SQFT_INFERENCE_THREADS``,
  default 2) whether or not a job trains; jobs take their own budget (``SQFT_THREADS_PER_JOB``). Nothing
  waits for the other; on a small machine both slow down, which an operator tunes with those two.
* Queueing: ``reserve()`` takes one of ``1 + max_queue`` slots (the API answers 429 when none is
  free); the single worker thread is the queue.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from .guided import GuideTokenizers, guide_processor
from .images import media_of, takes_images
from .logprobs import Recorder, TokenTexts, score_prompt, score_token
from .penalties import adjusted_processors, check_biases, vocabulary_size
from .spec import Choice, ModelSpec, Sampling, TokenLogprob
from .stream import Decoder

T = TypeVar("T")
_END = object()


@dataclass
class _Loaded:
    model: Any  # a transformers model, or a PeftModel around it once an adapter is attached
    adapters: dict[str, str] = field(default_factory=dict)  # adapter key (path@inode) → peft adapter name
    merged_from: str | None = None  # a SparsePEFT adapter's key: this model is the base with it merged in


def _adapter_key(path: str) -> str:
    # The inode changes when an extract or merge republishes a directory (publish_dir renames a new
    # one in), so a re-extracted sub-adapter is loaded afresh rather than served stale.
    return f"{path}@{Path(path).stat().st_ino}"


log = logging.getLogger(__name__)
# How the manager hands a job process the service's SQFT_INFERENCE_DTYPE (batch, eval and judge engines).
DTYPE_ENV = "SQFT_INFERENCE_DTYPE"


class InferenceEngine:
    def __init__(
        self,
        *,
        threads: int,
        max_queue: int,
        max_models: int,
        model_cache_dir: Path | None,
        device: str = "auto",
        dtype: str | None = None,
    ) -> None:
        self.threads = max(1, threads)
        self.device = device  # "auto": a GPU when there is one and the model fits; "cpu"
        # SQFT_INFERENCE_DTYPE (settings.py); None: a job's engine, as the manager set it for the job.
        self.dtype = dtype or os.environ.get(DTYPE_ENV) or "auto"
        self.max_models = max(1, max_models)
        self.model_cache_dir = model_cache_dir
        self.slots = 1 + max(0, max_queue)  # the one generating, and those that may wait behind it
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqft-inference")
        self._models: OrderedDict[str, _Loaded] = OrderedDict()
        self._tokenizers: dict[str, Any] = {}
        self._processors: dict[str, Any] = {}  # image-text models' (None: text only)
        self._token_texts: dict[int, TokenTexts] = {}  # by tokenizer (they live as long as the engine)
        self._guide_tokenizers = GuideTokenizers()  # structured outputs' view of the tokenizers
        self._names = itertools.count()
        self._torch_ready = False
        # What /metrics reports: prompt and generated tokens of the answers given, and requests holding a slot.
        self.prompt_tokens = self.generated_tokens = self.in_flight = 0
        self._slots_lock = threading.Lock()

    # ------------------------------------------------------------ API side
    def reserve(self) -> bool:
        """Take a slot for one request (False: the queue is full); ``release()`` when it is answered."""
        with self._slots_lock:
            if self.in_flight >= self.slots:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._slots_lock:
            if self.in_flight == 0:
                raise RuntimeError("release() without a reserve()")
            self.in_flight -= 1

    def _count(self, prompt: int, choices: list[Choice]) -> list[Choice]:
        """``choices`` (answered now) counted with their ``prompt`` tokens (worker thread only)."""
        self.prompt_tokens += prompt
        self.generated_tokens += sum(c.completion_tokens for c in choices)
        return choices

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self._executor.submit(fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ worker side
    def _setup_torch(self) -> None:
        if not self._torch_ready:
            import torch

            torch.set_num_threads(self.threads)
            self._torch_ready = True

    def _tokenizer(self, spec: ModelSpec, model_dir: str) -> Any:
        from ..training.models import load_tokenizer

        source = spec.tokenizer or model_dir
        if source not in self._tokenizers:
            self._tokenizers[source] = load_tokenizer(source)
        return self._tokenizers[source]

    def _processor(self, spec: ModelSpec, model: Any) -> Any:
        """An image-text model's processor (its images' resizing and tokens; ``inference/images.py``), or
        None for a model that reads text only."""
        from ..training.models import resolve_model_dir

        if getattr(getattr(model, "config", None), "vision_config", None) is None:
            return None
        source = spec.tokenizer or resolve_model_dir(spec.model, self.model_cache_dir)
        if source not in self._processors:
            from .images import load_processor

            try:
                processor = load_processor(source)
            except (OSError, ValueError, TypeError, ImportError) as exc:  # no processor saved beside the weights
                log.warning("no image processor for %s: %s", source, exc)
                processor = None
            self._processors[source] = processor if takes_images(model, processor) else None
        return self._processors[source]

    def _load(self, key: str, build: Callable[[], Any], merged_from: str | None = None) -> _Loaded:
        """The loaded model under ``key`` (built if absent), least recently used ones evicted beyond the bound."""
        loaded = self._models.get(key)
        if loaded is None:
            while len(self._models) >= self.max_models:
                self._models.popitem(last=False)
            loaded = self._models[key] = _Loaded(self._place(build()).eval(), merged_from=merged_from)
            weights = next(loaded.model.parameters())  # what SQFT_INFERENCE_DTYPE and the device made of it
            log.info("serving %s on %s in %s", key, weights.device, str(weights.dtype).removeprefix("torch."))
        self._models.move_to_end(key)
        return loaded

    def _place(self, model: Any) -> Any:
        """``model`` on the GPU (in bf16 or fp16 unless ``dtype`` is fp32) when ``device`` allows it, one
        is there and the model fits in its free memory; else on the CPU, in bf16 where ``dtype`` says
        so (``auto``: a CPU that runs bf16 natively, as fine-tunes train there; README). Adapters
        attached later follow their base (peft keeps their own weights in fp32)."""
        import torch

        from ..training.device import gpu_inference_dtype, operation_device
        from ..training.precision import native_bf16_supported

        if self.device != "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # an evicted model's blocks count as free only once given back
            dtype = torch.float32 if self.dtype == "fp32" else gpu_inference_dtype()
            device = operation_device(model, dtype=dtype)
            if device.type == "cuda":
                loaded_dtype = next(model.parameters()).dtype
                try:
                    return model.to(device, dtype=dtype)
                except torch.OutOfMemoryError:
                    pass  # a job took the memory since it was measured: serve from the CPU (traceback gone)
                model.to("cpu", dtype=loaded_dtype)  # the part that had moved comes back, as it was loaded
                torch.cuda.empty_cache()
        if self.dtype == "bf16" or (self.dtype == "auto" and native_bf16_supported()):
            return model.to(torch.bfloat16)
        return model

    def _activate(self, spec: ModelSpec) -> tuple[Any, Any, AbstractContextManager]:
        """The model with the spec's adapter active, its tokenizer, and the context to generate in."""
        from ..training.models import load_base_model, resolve_model_dir

        self._setup_torch()
        model_dir = resolve_model_dir(spec.model, self.model_cache_dir)
        tokenizer = self._tokenizer(spec, model_dir)
        if spec.adapter is not None and spec.sparse:
            # SparsePEFT trained W + M*(BA) (the update masked to the base's non-zeros); stock peft would
            # apply the unmasked BA. Its own model: a fresh base with the masked update merged in, which
            # computes what the trained model computed, keeps the zeros, and runs at the base's speed.
            # It counts against `max_models` like any base (the bound on memory).
            from ..adapters.merge import masked_merge

            adapter, key = spec.adapter, _adapter_key(spec.adapter)

            def build() -> Any:
                base = load_base_model(model_dir)
                return self._with_adapter_error(lambda: masked_merge(base, adapter))

            return self._load(f"{model_dir}+{key}", build, key).model, tokenizer, nullcontext()
        loaded = self._load(model_dir, lambda: load_base_model(model_dir))
        if spec.adapter is None:
            # Adapters attached for other requests are bypassed, not removed.
            context = loaded.model.disable_adapter() if loaded.adapters else nullcontext()
            return loaded.model, tokenizer, context
        key = _adapter_key(spec.adapter)
        if (name := loaded.adapters.get(key)) is None:
            name = self._attach(loaded, spec.adapter)
            loaded.adapters[key] = name
        loaded.model.set_adapter(name)
        return loaded.model, tokenizer, nullcontext()

    @staticmethod
    def _with_adapter_error(load: Callable[[], T]) -> T:
        try:
            return load()
        except Exception as exc:  # a damaged or foreign adapter directory: the request names it
            from ..training.models import ModelLoadError

            raise ModelLoadError(f"could not load the adapter of this model: {exc}".splitlines()[0]) from exc

    def _attach(self, loaded: _Loaded, adapter_dir: str) -> str:
        from peft import PeftModel

        name = f"a{next(self._names)}"
        if loaded.adapters:
            self._with_adapter_error(
                lambda: loaded.model.load_adapter(adapter_dir, adapter_name=name, is_trainable=False)
            )
        else:
            peft_model = self._with_adapter_error(
                lambda: PeftModel.from_pretrained(loaded.model, adapter_dir, adapter_name=name)
            )
            loaded.model = peft_model.eval()
        return name

    def forget(self, path: Path) -> None:
        """Drop every loaded model that uses ``path`` (a deleted adapter or merged model)."""
        prefix = f"{path}@"
        for key, loaded in list(self._models.items()):
            keys = [*loaded.adapters, loaded.merged_from or ""]
            if Path(key) == path or any(k.startswith(prefix) for k in keys):
                del self._models[key]

    def prepare(self, spec: ModelSpec, render: Callable[[Any], T]) -> tuple[T, int]:
        """Load what ``spec`` needs and render the prompt with its tokenizer (its token ids; ``/detokenize``:
        ids back to text), and the model's context length."""
        model, tokenizer, _ = self._activate(spec)
        config = getattr(model, "config", None)
        if getattr(render, "images", False):
            rendered = render(tokenizer, self._processor(spec, model))
        else:
            rendered = render(tokenizer)
        return rendered, _context_length(config)

    def check(self, spec: ModelSpec, sampling: Sampling) -> None:
        """What only the model can tell about ``sampling`` (its biases' token ids), before a stream begins."""
        model, _, _ = self._activate(spec)
        check_biases(sampling, vocabulary_size(model))

    def generate(self, spec: ModelSpec, ids: list[int], sampling: Sampling) -> list[Choice]:
        model, tokenizer, context = self._activate(spec)
        eos, texts = self._eos_ids(model, tokenizer), self._texts(tokenizer)
        scored = sampling.logprobs is not None
        with context:
            echo = self._echo(model, tokenizer, ids, sampling)
            if sampling.max_tokens == 0:
                rows, scores = [[] for _ in range(sampling.n)], None
            elif echo.after is not None and sampling.greedy and sampling.max_tokens == 1:
                # The prompt's forward already gave the next token's distribution (how lm-eval-harness
                # scores a continuation: echo, logprobs, one greedy token): no second pass.
                token = int(echo.after.argmax())
                first = score_token(texts, token, echo.after, sampling.logprobs or 0)
                rows, scores = [[token]] * sampling.n, [[first]] * sampling.n
            else:
                runs = _one_row(sampling)
                recorder = Recorder(model, texts, sampling.logprobs or 0) if scored else None
                scores = [[] for _ in range(runs.n)] if scored else None

                def keep(tokens: list[int]) -> None:
                    for row, token in enumerate(tokens):
                        scores[row].append(recorder.score(row, token))

                with recorder or nullcontext():
                    out = self._run(model, tokenizer, ids, runs, _streamer(keep) if scored else None)
                rows = out[:, len(ids) :].tolist() * (sampling.n // runs.n)
                scores = scores * (sampling.n // runs.n) if scores else None
        choices = []
        for row, tokens in enumerate(rows):
            decoder = Decoder(tokenizer, eos, sampling.stop)
            decoder.push(tokens, scores[row] if scores else None)
            decoder.close()
            choices.append(echo.choice(decoder, scored))
        return self._count(len(ids), choices)

    def generate_together(self, spec: ModelSpec, prompts: list[list[int]], samplings: list[Sampling]) -> list[Choice]:
        """One choice for each prompt, all prompts generated together (``inference/greedy.py``), each row
        then cut where it would have stopped alone (its ``max_tokens``, an end-of-sequence id, a stop
        string), held to its own grammar if it has one (structured outputs, required calls), and drawn
        at its own temperature and top-p (``inference/draw.py``): a greedy row gets the choice
        ``generate`` gives it, a sampled one a draw from the same distribution (so a seeded request,
        whose draws must repeat, is answered alone). A batch's many requests (``jobs/batch.py``)."""
        import secrets

        import torch
        from transformers import LogitsProcessorList

        from .draw import TokenDraw
        from .greedy import greedy_tokens

        assert all(
            (s.greedy or s.seed is None)
            and s.n == 1
            and not (s.logprobs is not None or s.logit_bias or s.presence_penalty or s.frequency_penalty)
            for s in samplings
        )
        model, tokenizer, context = self._activate(spec)
        eos = self._eos_ids(model, tokenizer)
        guided, sampled = any(s.grammar for s in samplings), not all(s.greedy for s in samplings)
        lltokenizer = self._guide_tokenizers.get(tokenizer, self._guide_eos(model, tokenizer)) if guided else None

        def processors(batch: list[int], width: int) -> Any:
            chain = LogitsProcessorList()
            if guided:  # structured outputs and required calls: each row its guide, before the draw
                grammars = [samplings[i].grammar for i in batch]
                chain.append(guide_processor(lltokenizer, grammars, len(batch), width))
            if sampled:
                chain.append(TokenDraw([samplings[i].temperature for i in batch], [samplings[i].top_p for i in batch]))
            return chain

        if sampled:  # as an unseeded request: the worker is this process's only torch user
            torch.manual_seed(secrets.randbits(63))
        with context:
            rows = greedy_tokens(
                model,
                prompts,
                [s.max_tokens for s in samplings],
                len(prompts),
                pad=tokenizer.pad_token_id,
                eos=eos,
                processors=processors if guided or sampled else None,
            )
        choices = []
        for row, sampling in zip(rows, samplings, strict=True):
            decoder = Decoder(tokenizer, eos, sampling.stop)
            decoder.push(row[: sampling.max_tokens])
            decoder.close()
            choices.append(Choice(decoder.text, decoder.finish_reason or "length", len(decoder.ids)))
        return self._count(sum(len(p) for p in prompts), choices)

    def stream(self, spec: ModelSpec, ids: list[int], sampling: Sampling, sink: queue.Queue, cancel: threading.Event):
        """Generate ``sampling.n`` choices in one batch, putting ``(index, text piece, token scores)``
        triples on ``sink`` as they are decoded (with ``echo``, the prompt first), then the list of
        final ``Choice``s, then the end mark."""
        try:
            if cancel.is_set():  # the client left while this generation waited (a later prompt of a list)
                return
            model, tokenizer, context = self._activate(spec)
            eos, texts = self._eos_ids(model, tokenizer), self._texts(tokenizer)
            scored = sampling.logprobs is not None
            recorder = Recorder(model, texts, sampling.logprobs or 0) if scored else None
            # One decoder per returned sequence: generate() expands the prompt to n rows and hands over
            # one token per row each step (a finished row gets padding, which its decoder ignores).
            decoders = [Decoder(tokenizer, eos, sampling.stop) for _ in range(sampling.n)]
            runs = _one_row(sampling)  # greedy: one row generated, each token handed to every decoder

            def put(tokens: list[int]) -> None:
                for index, decoder in enumerate(decoders):
                    row = index % runs.n
                    score = [recorder.score(row, tokens[row])] if recorder and not decoder.done else None
                    if piece := decoder.push([tokens[row]], score):
                        sink.put((index, piece, decoder.new_logprobs()))

            def stopped() -> list[bool]:  # per row: a row whose decoder saw EOS or a stop string ends
                return [cancel.is_set() or d.done for d in decoders[: runs.n]]

            with context:
                echo = self._echo(model, tokenizer, ids, sampling)
                if echo.text is not None:
                    for index in range(sampling.n):
                        sink.put((index, echo.text, list(echo.scores or ())))
                if sampling.max_tokens:
                    with recorder or nullcontext():
                        self._run(model, tokenizer, ids, runs, _streamer(put), stopped)
            for index, decoder in enumerate(decoders):
                piece, scores = decoder.close(), decoder.new_logprobs()
                if piece or scores:
                    sink.put((index, piece, scores))
            sink.put(self._count(len(ids), [echo.choice(d, scored) for d in decoders]))
        except Exception as exc:  # handed to the response, which is already under way
            sink.put(exc)
        finally:
            sink.put(_END)

    def _texts(self, tokenizer: Any) -> TokenTexts:
        if (texts := self._token_texts.get(id(tokenizer))) is None:
            texts = self._token_texts[id(tokenizer)] = TokenTexts(tokenizer)
        return texts

    def _echo(self, model: Any, tokenizer: Any, ids: list[int], s: Sampling) -> _Echo:
        """With ``echo``, the prompt's text, and with ``logprobs`` its tokens scored by one forward."""
        if not s.echo:
            return _Echo()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if s.logprobs is None:
            return _Echo(text)
        import torch

        try:
            scores, after = score_prompt(model, ids, self._texts(tokenizer), s.logprobs)
            return _Echo(text, tuple(scores), after)
        except torch.OutOfMemoryError:
            pass  # answered below, once the traceback (and the tensors it holds) is gone
        self._out_of_memory(model, 1, len(ids), 0)

    @staticmethod
    def _guide_eos(model: Any, tokenizer: Any) -> int:
        """The end-of-sequence id a guide allows once its grammar is complete (generate() stops on it)."""
        eos = InferenceEngine._eos_ids(model, tokenizer)
        return tokenizer.eos_token_id if tokenizer.eos_token_id in eos else min(eos)

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
        ids = {tokenizer.eos_token_id}
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    def _run(self, model: Any, tokenizer: Any, ids: list[int], s: Sampling, streamer: Any = None, stop: Any = None):
        """``s.n`` rows of generated tokens after ``ids`` (the prompt included): the prompt run once for
        them all (``inference/prompt_cache.py``), each row then drawn at ``s``'s temperature and top-p
        (``inference/draw.py``, after penalties, biases and a guide) or greedy."""
        import secrets

        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        from .draw import TokenDraw
        from .prompt_cache import generate_copies

        class Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.tensor(stop(), dtype=torch.bool, device=input_ids.device)

        prompt = torch.tensor([ids], device=next(model.parameters()).device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": s.max_tokens,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": sorted(self._eos_ids(model, tokenizer)),
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([Stop()]) if stop else None,
        }
        chain = LogitsProcessorList()
        if s.adjusted:  # penalties, biases, a guide: applied before the draw (inference/penalties.py)
            vocabulary = vocabulary_size(model)
            check_biases(s, vocabulary)
            guide = None
            if s.grammar is not None:
                lltokenizer = self._guide_tokenizers.get(tokenizer, self._guide_eos(model, tokenizer))
                guide = guide_processor(lltokenizer, s.grammar, s.n, len(ids))
            chain.extend(adjusted_processors(s, len(ids), vocabulary, prompt.device, guide))
        if not s.greedy:  # OpenAI's sampling: temperature and top-p, no top-k
            chain.append(TokenDraw([s.temperature] * s.n, [s.top_p] * s.n))
        kwargs["logits_processor"] = chain
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=tokenizer)
        # The worker is the only torch user in this process, so the global RNG is this request's alone.
        torch.manual_seed(s.seed if s.seed is not None else secrets.randbits(63))
        try:
            with torch.inference_mode():
                media = {k: v.to(prompt.device) for k, v in (media_of(ids) or {}).items()}
                return generate_copies(model, prompt, torch.ones_like(prompt), s.n, media, **kwargs)
        except torch.OutOfMemoryError:
            pass  # answered below, once the traceback (and the tensors it holds) is gone
        self._out_of_memory(model, s.n, len(ids), s.max_tokens)

    @staticmethod
    def _out_of_memory(model: Any, rows: int, n_prompt: int, max_tokens: int) -> NoReturn:
        from ..errors import EngineOutOfMemoryError
        from ..training.device import model_device
        from ..training.memory import free_cached

        device = model_device(model)
        free_cached(device)
        raise EngineOutOfMemoryError(
            f"{device} has no memory left for {rows} sequence(s) of {n_prompt} + up to {max_tokens} "
            "tokens now; retry later, or ask for fewer (`n`, `max_tokens`)"
        )


@dataclass(frozen=True)
class _Echo:
    """What ``echo`` puts before a choice: the prompt's text, its tokens' scores (with ``logprobs``), and
    the distribution of the token after it (the prompt's forward gives it)."""

    text: str | None = None
    scores: tuple[TokenLogprob, ...] | None = None
    after: Any = None

    def choice(self, decoder: Decoder, scored: bool) -> Choice:
        logprobs = tuple(decoder.logprobs) if scored else None
        n = len(decoder.ids)
        return Choice(decoder.text, decoder.finish_reason or "length", n, logprobs, self.text, self.scores)


def _one_row(sampling: Sampling) -> Sampling:
    """What to generate for ``sampling``'s choices: greedy rows are all alike (each step the argmax of
    the same history, through the same penalties, biases and guide), so one row, given to every choice."""
    return replace(sampling, n=1) if sampling.greedy and sampling.n > 1 else sampling


def _streamer(on_tokens: Callable[[list[int]], None]) -> Any:
    """A transformers streamer handing ``on_tokens`` each step's picked token per row (the prompt,
    which generate() hands over first, skipped)."""
    from transformers.generation.streamers import BaseStreamer

    class Streamer(BaseStreamer):
        prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            on_tokens(value.reshape(value.shape[0], -1)[:, -1].tolist())

        def end(self) -> None:
            pass

    return Streamer()


def drain(sink: queue.Queue) -> Iterator[Any]:
    """The items ``stream`` puts on ``sink``, until its end mark."""
    while (item := sink.get()) is not _END:
        yield item


def _context_length(config: Any) -> int:
    """The model's context (an image-text model's is its text decoder's); 0: unknown."""
    if config is None:
        return 0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "max_position_embeddings", 0) or 0)
