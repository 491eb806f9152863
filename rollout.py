"""Rollouts: sample responses with Hugging Face `generate`, score them, and build the experience batch.

Also the per-token log-probs of the training forward pass and the critic-free baselines (GRPO's group
mean/std and RLOO's leave-one-out). Tensors are named as in veRL/TRL: `logprobs`, `old_logprobs`,
`response_mask`; shapes are (B, P) for prompts, (B, R) for responses.

Layout of a batch row:  [pad pad p0 p1 ... p_{P-1} | r0 r1 ... r_k pad pad]
  prompts are left-padded to P (generation needs the last prompt token at the same column everywhere),
  responses right-padded to R. The logit at column t predicts token t+1, so response log-probs come from
  columns P-1 .. P+R-2.
"""

import math
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

# The OpenMP spin setting of train_ppo.py (see there), before torch loads, for the entry points that import
# this module first (evaluate.py, data/curate.py).
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from data.loading import ORZ_STOP_STRINGS
from utils import left_pad, position_ids_from_mask, save_on_this_process

LOGIT_CHUNK = 16  # rows per chunk of the full-vocabulary log-softmax: fp32 logits of all rows at once would not fit
# Full-vocabulary logits per chunk of tokens in the log-prob passes (ChunkedLogprobs): 2**25 fp32 values,
# 128 MiB, whatever the vocabulary (682 tokens of SmolLM2's 49,152, 220 of Qwen2.5's 151,936).
LOGIT_CHUNK_ELEMENTS = 2**25


@dataclass
class ModelArgs:
    """The model arguments of every command that loads one (training, evaluation, curation); parsed by
    cli.parse_args, like every argument class."""

    model: str = field(default="tiny", metadata={
        "group": "model and data", "help": "hub id, local path, or 'tiny' (built-in, made offline)"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow model code from the hub (off: it runs arbitrary code)"})


@dataclass
class SamplingArgs:
    """How every command that samples responses samples them (training, evaluation, curation)."""

    prompt_template: str = field(default="orz", metadata={
        "group": "sampling", "help": "'orz' (ORZ's plain-text template), 'chat', 'raw', or a string with {question}"})
    max_new_tokens: int = field(default=32, metadata={"help": "response length limit; longer responses are truncated"})
    temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature (in training it also divides the logits of the update; evaluation: 0 is greedy "
                "and needs --num-samples 1)"})
    top_p: float = field(default=1.0, metadata={
        "help": "nucleus sampling; keep 1.0 for training: the log-probs of the update do not replay truncation"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off); keep 0 for training, as --top-p"})
    stop_strings: list[str] = field(default_factory=lambda: list(ORZ_STOP_STRINGS), metadata={
        "help": "strings that end a response (kept in it)"})


@dataclass
class EngineArgs:
    """Which engine samples, for every command that samples (training, evaluation, curation)."""

    rollout_engine: Literal["hf", "vllm"] = field(default="hf", metadata={
        "help": "hf: HF generate (the trained model's own code); vllm: a vLLM engine in this process (vllm_engine.py; "
                "install requirements-vllm.txt), which training gives the policy's weights after every update"})
    rollout_dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={
        "help": "vllm: the engine's precision (the update's is --bf16's)"})


@dataclass
class RolloutArgs(EngineArgs):
    """How training generates its rollouts (the engine, HF generate's batching), and how the update corrects
    for a sampler whose log-probs differ from the trainer's."""

    generation: Literal["generate", "refill"] = field(default="refill", metadata={
        "group": "rollout", "help": "refill: rows still running when most have stopped continue in a smaller call, "
                "so little decoding is spent on finished rows (rollout.generate_responses_refill; same sampling); "
                "generate: plain batched HF generate (also used under FSDP, and for models with linear-attention or "
                "convolution layers)"})
    refill_fraction: float = field(default=0.85, metadata={
        "help": "refill: end a call when at most this share of its rows is still running"})
    generation_batch_size: int = field(default=0, metadata={
        "help": "prompts per generate call (0: all of the process's prompts at once); each call is seeded from "
                "(seed, step, its first prompt's place), so with a size that divides every process's share, 1 and N "
                "processes sample the same tokens"})
    tis_cap: float = field(default=0.0, metadata={
        "help": "truncated importance sampling: each token's policy loss weighed by min(pi_old / pi_sampler, C), "
                "for a sampler that differs from the trainer (0: off)"})


@dataclass
class Experience:
    """One rollout: B = prompts x samples per prompt rows, on this process."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) right-padded
    response_mask: torch.Tensor  # (B, R) float, 1 up to and including the first stop
    truncated: torch.Tensor  # (B,) bool: hit max_new_tokens without stopping
    group_ids: torch.Tensor  # (B,) rows with the same id were sampled from the same draw of a prompt
    rewards: torch.Tensor | None = None  # (B,)
    old_logprobs: torch.Tensor | None = None  # (B, R)
    sampler_logprobs: torch.Tensor | None = None  # (B, R) the sampler's own log-probs of the response tokens
    ref_logprobs: torch.Tensor | None = None  # (B, R)
    values: torch.Tensor | None = None  # (B, R)
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)
    cov_tokens: torch.Tensor | None = None  # (B, R) bool: --entropy-control's tokens (Clip-Cov's, KL-Cov's)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    def select(self, index: torch.Tensor) -> "Experience":
        """The rows `index` of every tensor field (a mini- or micro-batch)."""
        return Experience(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                             for f in fields(self)})

    def trim(self) -> "Experience":
        """The same rows without columns that are padding in every row: prompt columns on the left,
        response columns on the right. A micro-batch of similar lengths then computes on few pads."""
        p = int(self.prompt_mask.any(dim=0).long().argmax()) if self.prompt_mask.any() else self.prompt_mask.shape[1]
        r = max(int(self.response_mask.sum(dim=1).max()), 1)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and f.name.startswith("prompt_"):
                v = v[:, p:]
            elif v is not None and v.dim() == 2:
                v = v[:, :r]
            out[f.name] = v
        return Experience(**out)

    def per_token(self, micro_batches: list[torch.Tensor], fn) -> torch.Tensor:
        """`fn(micro-batch)` -> (b, r) over the whole batch, one trimmed micro-batch at a time, assembled
        into (B, R) float32, 0 outside the response mask. `micro_batches` are row-index tensors, as
        `plan_micro_batches` makes them; an empty one (another process has more) runs row 0 and writes
        nothing, so that every process runs the same passes."""
        out = torch.zeros_like(self.response_mask, dtype=torch.float32)
        for rows in micro_batches:
            mb = self.select(rows if len(rows) else torch.zeros(1, dtype=torch.long, device=rows.device)).trim()
            values = fn(mb)
            if len(rows):
                out[rows, :values.shape[1]] = values.float()
        return out * self.response_mask


# Generation config fields that do not change which token is drawn: kept from the checkpoint when sampling.
NEUTRAL_GENERATION_FIELDS = ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id",
                             "cache_implementation", "cache_config", "use_cache", "transformers_version")


def neutral_generation_config(model) -> list[str]:
    """Replace `model.generation_config` with one that keeps only NEUTRAL_GENERATION_FIELDS, and return the
    names of the other fields the checkpoint had set (away from transformers' defaults).

    `generate` fills whatever a call leaves unset from the model's generation config, so a checkpoint's
    repetition_penalty, no_repeat_ngram_size, min_new_tokens, bad_words_ids, top-k/top-p... would reshape
    the sampled distribution while the training log-probs replay plain softmax(logits / T): the PPO ratio
    and the policy gradient would then be for a policy that did not sample. Callers pass temperature,
    top-p and top-k explicitly. The checkpoint's config stays in `model.reasoner_zero_original_generation_config`.
    """
    from transformers import GenerationConfig

    original = model.generation_config
    defaults = GenerationConfig().to_dict()
    changed = sorted(k for k, v in original.to_diff_dict().items()  # False where the default is None: not set
                     if k not in NEUTRAL_GENERATION_FIELDS and v != defaults.get(k) and not k.startswith("_")
                     and (v or defaults.get(k)))
    clean = GenerationConfig(**{k: getattr(original, k) for k in NEUTRAL_GENERATION_FIELDS
                                if getattr(original, k, None) is not None and k != "transformers_version"})
    if not hasattr(model, "reasoner_zero_original_generation_config"):  # a second call must keep the first's
        model.reasoner_zero_original_generation_config = original
    model.generation_config = clean
    return changed


def load_sampling_model(path: str, engine: str = "hf", trust_remote_code: bool = False):
    """The model evaluation and curation sample with: the HF model (fp32, safetensors only), or, when the vLLM
    engine samples (`engine` "vllm"), a stand-in holding only what is read of it (`config`,
    `generation_config`: stop ids, the checkpoint's settings), so that the weights are not loaded a second
    time beside the engine's. Raises OSError or ValueError as transformers does."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if engine == "hf":
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, use_safetensors=True)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:  # as from_pretrained sets it: the checkpoint's generation_config.json, else from the model config
        generation = GenerationConfig.from_pretrained(path)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    return SimpleNamespace(config=config, generation_config=generation)


def prepare_for_sampling(tokenizer, model, log=print, checkpoint_settings: bool = False) -> list[int]:
    """Set the tokenizer up for batched sampling (left padding; EOS as pad when it has none, which is safe:
    masks come from stop positions, not from pad), set aside the checkpoint's sampling settings
    (`neutral_generation_config`, reported through `log`) unless `checkpoint_settings` (evaluation, when
    asked) and return the stop token ids: the tokenizer's EOS and every EOS of the model's generation config.
    Training, evaluation and curation all sample this way."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if checkpoint_settings:
        settings = {k: v for k, v in model.generation_config.to_diff_dict().items()
                    if k not in NEUTRAL_GENERATION_FIELDS and not k.startswith("_")}
        log(f"sampling with the checkpoint's generation settings: {settings or 'none (plain sampling)'}")
        overridden = []
    else:
        overridden = neutral_generation_config(model)
    if overridden:
        log(f"sampling from softmax(logits / temperature) only: ignoring the checkpoint's generation settings "
            f"{', '.join(overridden)}")
    eos = model.generation_config.eos_token_id
    return sorted({tokenizer.eos_token_id,
                   *(eos if isinstance(eos, list) else [eos] if eos is not None else [])} - {None})


def model_problems(model: str) -> list[str]:
    """[] if `model` can be loaded as far as can be told without loading it: 'tiny', a directory with a
    config.json, a GGUF file (or a directory holding one), or a hub id whose config.json can be fetched
    (from the local cache when offline, as HF_HUB_OFFLINE asks); else one message."""
    if model == "tiny":
        return []
    file = gguf_file(model)
    if file is not None:
        return gguf_problems(model, file)
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return model_dir_problems(model, path)
        ggufs = sorted(path.glob("*.gguf"))
        return [f"--model {model}: {len(ggufs)} .gguf files in this directory ({', '.join(g.name for g in ggufs)})"
                f": name one of them"] if ggufs else [
            f"--model {model}: no config.json in this directory (a model saved with save_pretrained has one), "
            f"and no .gguf file"]
    if path.exists():
        return [f"--model {model}: a file, not a model directory, a .gguf file or a hub id"]
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith(".gguf"):
        return [f"--model {model}: no such path (and not a hub id)"]
    return hub_model_problems(model)


def model_dir_problems(model: str, path: Path) -> list[str]:
    """[] if the model directory `path` holds what training loads, before anything loads: a config.json of a
    causal language model (an encoder such as BertForMaskedLM attends both ways and would train as a policy
    without a word from transformers), safetensors weights (the only weights format loaded) and a tokenizer."""
    import json

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        kind, classes = config.get("model_type"), config.get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return [f"--model {model}: its config.json is not a JSON object"]
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if config.get("is_encoder_decoder") or (not any(c in causal for c in classes) if classes
                                             else kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        what = ", ".join(map(str, classes)) or f"model_type {kind}"
        return [f"--model {model}: a {what} (config.json), not a causal language model: the policy must be one "
                "that AutoModelForCausalLM loads (such as LlamaForCausalLM)"]
    problems = []
    if not list(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin"))
        problems.append(f"--model {model}: no .safetensors weights in this directory" + (
            f" ({', '.join(pickled)} is pickled, which is not loaded: save the model with safe_serialization)"
            if pickled else ""))
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        problems.append(f"--model {model}: no tokenizer in this directory (tokenizer.json or tokenizer_config.json)")
    return problems


def gguf_problems(model: str, file: Path) -> list[str]:
    """[] if `file` starts as a GGUF file does and the gguf package that reads it is installed."""
    with open(file, "rb") as f:
        if f.read(4) != b"GGUF":
            return [f"--model {model}: {file.name} is not a GGUF file (it does not start with the bytes GGUF)"]
    try:
        import gguf  # noqa: F401 - transformers reads GGUF files with it
    except ImportError:
        return [f"--model {model}: reading a .gguf file needs the gguf package: pip install gguf"]
    return []


def gguf_file(model: str) -> Path | None:
    """The GGUF file that `model` names: the file itself, or the one .gguf file of a directory that has no
    config.json; None if `model` is not one."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() and not (path / "config.json").exists() else []
    return ggufs[0] if len(ggufs) == 1 else None


def resolve_model(model: str, log=print) -> str:
    """What `from_pretrained` loads for --model: the tiny base's directory for 'tiny' (built once), the
    safetensors copy of a GGUF file (converted once, `convert_gguf`), else `model` itself."""
    from data.synthetic import build_tiny_base

    if model == "tiny":
        return str(build_tiny_base(log=log))
    file = gguf_file(model)
    return str(convert_gguf(file, log=log)) if file else model


def convert_gguf(file: Path, cache_dir: str | None = None, log=print) -> Path:
    """The directory of a float32 safetensors copy of GGUF model `file`, with its tokenizer, made once and
    cached under a key of the file's name and content hash (an edited file is converted again).

    transformers de-quantizes a GGUF file each time it loads one (about 15 s for a 135M model here) and
    refuses to `save_pretrained` the result; every later load (policy, critic, reference, each process) reads
    the copy instead, and checkpoints of the trained model are ordinary safetensors directories.
    """
    import xxhash

    from utils import build_once, cache_root, saved_model_problem

    digest = xxhash.xxh3_64()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    path = (Path(cache_dir) if cache_dir else cache_root()) / f"gguf-{file.stem}-{digest.hexdigest()}"
    return build_once(path, lambda tmp: _convert_gguf(file, tmp, path, log), log, f"the safetensors copy of {file}",
                      check=saved_model_problem)


def _convert_gguf(file: Path, tmp: Path, path: Path, log) -> None:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {file} to a float32 safetensors model, once (cached at {path}) ...")
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    # The weights are de-quantized floats now; the marker that they came quantized is what refuses saving.
    del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    save_on_this_process(model, tmp)  # each machine converts into its own cache, on whichever process
    tokenizer.save_pretrained(tmp)
    (tmp / "reasoner_zero_source.json").write_text(json.dumps(
        {"gguf_file": str(file.resolve()), "bytes": file.stat().st_size, "xxh3_64": path.name.rsplit("-", 1)[1]}))
    log(f"converted {file.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


def hub_model_problems(model_id: str) -> list[str]:
    """[] if the config.json of hub model `model_id` can be fetched (or is cached, when offline); else one
    message saying why. Fetching it is what loading the model would do first."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    verbosity = huggingface_hub.utils.logging.get_verbosity()
    huggingface_hub.utils.logging.set_verbosity_error()  # its retries would each print a line
    try:
        huggingface_hub.hf_hub_download(model_id, "config.json")
        return []
    except errors.HFValidationError:
        why = "no such path, and not a valid hub id"
    except errors.GatedRepoError:
        why = "a gated model: accept its terms on huggingface.co and log in (hf auth login)"
    except errors.RepositoryNotFoundError:
        why = "no such model on the Hugging Face hub (or it is private: log in with hf auth login)"
    except errors.RemoteEntryNotFoundError:
        why = "its hub repository has no config.json"
    except errors.LocalEntryNotFoundError:
        why = ("not in the local Hugging Face cache, and HF_HUB_OFFLINE is set (download it once online, or "
               "unset HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else
               "not in the local Hugging Face cache, and the hub cannot be reached")
    except Exception as err:  # noqa: BLE001 - any other failure to resolve it is reported the same way
        first_line = (str(err).splitlines() or [""])[0][:200]
        why = f"cannot fetch its config.json from the hub ({type(err).__name__}: {first_line})"
    finally:
        huggingface_hub.utils.logging.set_verbosity(verbosity)
    return [f"--model {model_id}: {why}"]


def plan_micro_batches(lengths: torch.Tensor, max_rows: int, max_tokens: int = 0,
                       num_batches: int | None = None, max_padding: float = 1.0,
                       prompt_lengths: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Split rows into micro-batches of similar length: sorted by length, then cut greedily so that each
    holds at most `max_rows` rows, if `max_tokens` > 0 at most `max_tokens` padded tokens (rows x width),
    and at most a `max_padding` share of padding (1.0: no limit). A micro-batch is as wide as its longest
    row or, with `prompt_lengths` (then `lengths` - `prompt_lengths` are the response lengths), as its
    longest prompt plus its longest response: left-padded prompts and right-padded responses, as
    `Experience.trim` cuts them. `num_batches` forces at least that many (every process must run the
    same number of forward passes under sharded training) by splitting the fullest in two, which may pad
    more than the cap; empty ones come back as empty index tensors. lengths (B,) -> list of index tensors.
    Example: lengths [5, 1, 4, 2], max_rows 2 -> [[0, 2], [3, 1]]; with max_padding 0.1 -> [[0, 2], [3], [1]]
    ([3, 1] would be 2 padded tokens of 4).
    """
    prompts = prompt_lengths if prompt_lengths is not None else torch.zeros_like(lengths)
    order = torch.argsort(lengths, descending=True, stable=True)
    batches, current, total, longest = [], [], 0, (0, 0)  # longest (prompt, response) of the current batch
    for i in order.tolist():
        length, prompt = int(lengths[i]), int(prompts[i])
        longest_if = (max(longest[0], prompt), max(longest[1], length - prompt))
        padded_if = sum(longest_if) * (len(current) + 1)
        if current and (len(current) >= max_rows or (max_tokens > 0 and padded_if > max_tokens)
                        or padded_if - total - length > max_padding * padded_if):
            batches.append(current)
            current, total, longest_if = [], 0, (prompt, length - prompt)
        current.append(i)
        longest, total = longest_if, total + length
    if current:
        batches.append(current)
    while num_batches is not None and len(batches) < num_batches:
        big = max(range(len(batches)), key=lambda b: len(batches[b])) if batches else None
        if big is None or len(batches[big]) < 2:
            batches.append([])
        else:  # split the fullest micro-batch in two
            half = len(batches[big]) // 2
            batches[big:big + 1] = [batches[big][:half], batches[big][half:]]
    return [torch.tensor(b, dtype=torch.long, device=lengths.device) for b in batches]


KV_CHUNK = 256  # most spare positions a growing KV cache adds at a time: bounded memory, rare copies


class GrowingLayer(DynamicLayer):
    """One layer of `growing_kv_cache`: appends keys and values in place into a buffer with spare positions
    (as many as it holds, at most KV_CHUNK) and returns views of its filled part. HF's DynamicLayer
    concatenates instead, copying the whole layer cache at every decoding step. Operations that replace
    `keys` (crop, row selection, reset, offload) release the buffer; the next update starts a new one.
    `key_buffer` and `value_buffer` are the buffers, spare positions included (None once released)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, add = self.get_seq_length(), key_states.shape[-2]
        if self.keys is not getattr(self, "_view", None) or n + add > self.key_buffer.shape[-2]:
            size = n + add + min(n + add, KV_CHUNK)
            self.key_buffer = key_states.new_empty((*key_states.shape[:2], size, key_states.shape[-1]))
            self.value_buffer = value_states.new_empty((*value_states.shape[:2], size, value_states.shape[-1]))
            if n:
                self.key_buffer[:, :, :n], self.value_buffer[:, :, :n] = self.keys, self.values
        self.key_buffer[:, :, n:n + add], self.value_buffer[:, :, n:n + add] = key_states, value_states
        self.keys, self.values = self.key_buffer[:, :, :n + add], self.value_buffer[:, :, :n + add]
        self._view = self.keys
        return self.keys, self.values

    def _release(self):
        self.key_buffer = self.value_buffer = self._view = None

    def crop(self, tokens_to_remove: int):
        super().crop(tokens_to_remove)
        self._release()

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._release()

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._release()

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._release()

    def reset(self):
        super().reset()
        self._release()

    def offload(self):
        super().offload()
        self._release()


def growing_kv_cache(model) -> DynamicCache | None:
    """A fresh KV cache for one `generate` call (its `cache=`) whose full-attention layers grow in place, or
    None, which leaves `generate` its own cache: when the generation config names a cache implementation
    (HF takes one or the other), or when a layer keeps more than keys and values (linear attention,
    convolution states), which `generate_responses_refill` could not drop rows from. Sliding-window layers
    stay HF's.

    Attention sees exactly the values DynamicCache gives it, so the sampled tokens are identical (tested);
    what goes is DynamicCache's copy of the whole cache at every step, O(L^2) memory traffic per call:
    with it, plain generate took 1.07-1.35x as long in `python benchmark.py decode` (README, Speed)."""
    if getattr(model.generation_config, "cache_implementation", None):
        return None
    cache = DynamicCache(config=model.config)
    if not cache.layers or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers):
        return None
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@torch.no_grad()
def generate_responses(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, num_generations: int,
                       max_new_tokens: int, temperature: float | None, top_p: float | None, top_k: int | None,
                       stop_token_ids: list[int], pad_token_id: int, stop_strings: list[str] | None = None,
                       tokenizer=None, batch_size: int | None = None,
                       seeds: list[int] | None = None, synced_gpus: bool = False,
                       logprobs_out: dict | None = None) -> torch.Tensor:
    """Sample `num_generations` responses per prompt; returns (B * G, R) ids, rows grouped by prompt.

    Generates in eval mode with the KV cache on: with gradient checkpointing in train mode HF drops the
    cache and re-runs the prefix at every token. `batch_size` caps prompts per call.
    `seeds`, one per call, reseeds torch before it: a call's samples then depend only on its seed and its
    prompts (left padding shared by all of its prompts is cut first), not on what else this process or
    other processes generate, so that runs on 1 or N processes and resumed runs sample the same tokens.
    `temperature` None (evaluation with the checkpoint's settings) leaves sampling to the model's generation
    config, which `prepare_for_sampling` otherwise empties.
    `synced_gpus` keeps every process stepping until all are done, which sharded models (FSDP) need:
    each decoding step gathers parameters from all processes.
    `logprobs_out`, if given, receives "logprobs": (B * G, R), the sampler's log-prob of each returned token
    (`SamplerLogprobs`; 0 in the padding).
    """
    from transformers import LogitsProcessorList

    was_training = model.training
    model.eval()
    do_sample = temperature is None or temperature > 0
    kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=num_generations,
                  eos_token_id=stop_token_ids, pad_token_id=pad_token_id, use_cache=True,
                  synced_gpus=synced_gpus)
    if temperature is not None:
        kwargs.update(do_sample=do_sample)
    if temperature is not None and do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    recorder = SamplerLogprobs(temperature or 1.0) if logprobs_out is not None else None
    if recorder is not None:
        kwargs.update(logits_processor=LogitsProcessorList([recorder]))
    chunks, logprobs = [], []
    step = batch_size or len(prompt_ids)
    for n, start in enumerate(range(0, len(prompt_ids), step)):
        ids, mask = prompt_ids[start:start + step], prompt_mask[start:start + step]
        first = int(mask.any(dim=0).long().argmax())
        ids, mask = ids[:, first:], mask[:, first:]
        if seeds is not None:
            torch.manual_seed(seeds[n])
        out = model.generate(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                             cache=growing_kv_cache(model), **kwargs)
        chunks.append(out[:, ids.shape[1]:])
        if recorder is not None:
            logprobs.append(recorder.finish(chunks[-1]))
    model.train(was_training)
    width = max(c.shape[1] for c in chunks)
    if recorder is not None:
        logprobs_out["logprobs"] = torch.cat([F.pad(c, (0, width - c.shape[1])) for c in logprobs])
    return torch.cat([F.pad(c, (0, width - c.shape[1]), value=pad_token_id) for c in chunks])


class SamplerLogprobs:
    """Logits processor that records the sampler's log-prob of each token it samples, under softmax(logits / T)
    of the logits `generate` computed (the distribution the trainer replays; top-p/top-k are not applied, as
    the trainer does not apply them): the trainer's recomputed log-probs are compared with these
    (`rollout/logprob_diff_*`) and truncated importance sampling (--tis-cap) weighs by them.

    HF runs custom processors before its temperature and top-p/top-k warpers, on fp32 logits. At step t the
    token drawn at t - 1 is the last of `input_ids`: its log-prob is read from the one step kept; `finish`
    reads the last step's. `steps` ends as a list of (rows,) tensors, one per decoding step."""

    def __init__(self, temperature: float):
        self.temperature = temperature if temperature and temperature > 0 else 1.0
        self.last, self.steps = None, []

    def _read(self, input_ids: torch.Tensor) -> None:
        if self.last is not None:
            self.steps.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._read(input_ids)
        self.last = (scores.float() / self.temperature).log_softmax(-1)
        return scores

    def finish(self, new_ids: torch.Tensor) -> torch.Tensor:
        """(rows, n) log-probs of a call's n new tokens `new_ids` (rows, n), the part of `generate`'s output
        after the prompt; the last token's comes from the step kept."""
        if self.last is not None and len(self.steps) < new_ids.shape[1]:
            self._read(new_ids[:, :len(self.steps) + 1])
        self.last = None
        out = torch.stack(self.steps, dim=1) if self.steps else new_ids.new_zeros((len(new_ids), 0), dtype=torch.float)
        self.steps = []
        return out[:, :new_ids.shape[1]]


class RefillStop:
    """Stopping criterion of one `generate_responses_refill` call: tracks which rows have stopped (a stop
    token, or a stop string through HF's own StopStringCriteria) and ends the whole call once at most
    `keep` rows are still running. Rows it ends early did not stop: the caller continues them."""

    def __init__(self, keep: int, stop_token_ids: list[int], string_stop=None):
        self.finished, self.ended = None, False
        self.keep, self.stop_ids, self.string_stop = keep, stop_token_ids, string_stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.finished is None:
            self.finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.ended:  # asked again after ending the call (HF checks a step late on some devices, e.g. MPS):
            return torch.ones_like(self.finished)  # that step's tokens are pad for every row and are undone
        last = input_ids[:, -1]
        done = torch.isin(last, torch.tensor(self.stop_ids, device=last.device))
        if self.string_stop is not None:
            done |= self.string_stop(input_ids, scores)
        self.finished |= done
        if int((~self.finished).sum()) <= self.keep:
            self.ended = True
            return torch.ones_like(self.finished)
        return self.finished.clone()


@torch.no_grad()
def generate_responses_refill(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, num_generations: int,
                              max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                              stop_token_ids: list[int], pad_token_id: int, stop_strings: list[str] | None = None,
                              tokenizer=None, batch_size: int | None = None, seeds: list[int] | None = None,
                              synced_gpus: bool = False, refill_fraction: float = 0.85,
                              stats: dict | None = None, logprobs_out: dict | None = None) -> torch.Tensor:
    """`generate_responses` with the same signature and return ((B * G, R) ids, rows grouped by prompt),
    wasting little decode work on rows that have already stopped.

    Plain batched `generate` keeps every row in the batch until the longest one stops: with RL's widely
    spread lengths many row-steps decode rows that are already done. Here a call ends as soon as at most
    `refill_fraction` of its rows are still running; the KV cache drops the other rows and the next
    `generate` call continues the running ones from it (HF feeds only their last token), with the
    remaining token budget, and so on until every row has stopped or used `max_new_tokens`. Sampling is
    unchanged: every token is drawn from the same processed distribution (temperature, top-p, top-k are
    per-token and stateless) given the same cached keys and values, under the same stop token ids and stop
    strings (HF's StopStringCriteria looks at the tail of prompt + output, which spans the restart), so
    `stop_positions` and the masks apply as before; greedy decoding gives plain generate's rows (fp32, tested).
    With `seeds`, each chunk of `batch_size` prompts is reseeded before its first call, which therefore
    draws exactly the tokens `generate_responses` draws up to the point it ends; later calls draw from the
    same distribution with the generator state they find. `synced_gpus` is not supported (sharded models
    need every process to run the same calls): use `generate_responses` there, as this function itself does
    for models whose cache `growing_kv_cache` leaves to HF (linear attention, convolutions, or a cache
    implementation in the generation config). `stats`, if given, receives "row_steps" (rows x decode steps
    run), "tokens" (generated tokens up to each row's stop) and "calls"; `logprobs_out` as in
    `generate_responses`.
    """
    from transformers import LogitsProcessorList, StoppingCriteriaList
    from transformers.generation.stopping_criteria import StopStringCriteria

    if synced_gpus:
        raise ValueError("generate_responses_refill does not support synced_gpus (FSDP): use generate_responses")
    if not 0 <= refill_fraction < 1:
        raise ValueError(f"refill_fraction must be in [0, 1), got {refill_fraction}")
    if growing_kv_cache(model) is None:  # no cache we can drop rows from (see there): plain batched generate
        return generate_responses(model, prompt_ids, prompt_mask, num_generations=num_generations,
                                  max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                  stop_token_ids=stop_token_ids, pad_token_id=pad_token_id,
                                  stop_strings=stop_strings, tokenizer=tokenizer, batch_size=batch_size, seeds=seeds,
                                  logprobs_out=logprobs_out)
    was_training = model.training
    model.eval()
    do_sample = temperature > 0
    kwargs = dict(do_sample=do_sample, eos_token_id=stop_token_ids, pad_token_id=pad_token_id, use_cache=True)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    string_stop = StopStringCriteria(tokenizer, stop_strings) if stop_strings else None
    recorder = SamplerLogprobs(temperature) if logprobs_out is not None else None
    if recorder is not None:
        kwargs.update(logits_processor=LogitsProcessorList([recorder]))
    step = batch_size or len(prompt_ids)
    outputs: list[list[int]] = [[] for _ in range(len(prompt_ids) * num_generations)]
    logprobs: list[list[float]] = [[] for _ in outputs]
    row_steps = calls = 0
    for n, start in enumerate(range(0, len(prompt_ids), step)):
        ids, mask = prompt_ids[start:start + step], prompt_mask[start:start + step]
        cut = int(mask.any(dim=0).long().argmax())  # as generate_responses: drop padding shared by every prompt
        call_ids, call_mask = ids[:, cut:], mask[:, cut:]
        active = list(range(start * num_generations, (start + len(ids)) * num_generations))  # output rows
        extra = dict(num_return_sequences=num_generations)  # the first call is exactly generate_responses' call
        cache = growing_kv_cache(model)
        budget = max_new_tokens
        if seeds is not None:
            torch.manual_seed(seeds[n])
        while active and budget > 0:
            rows = len(active)
            keep = math.floor(refill_fraction * rows) if rows > 1 else 0
            criterion = RefillStop(keep, stop_token_ids, string_stop)
            out = model.generate(input_ids=call_ids, attention_mask=call_mask, cache=cache,
                                 position_ids=position_ids_from_mask(call_mask), max_new_tokens=budget,
                                 stopping_criteria=StoppingCriteriaList([criterion]), **kwargs, **extra)
            new = out[:, call_ids.shape[1]:]
            steps = new.shape[1]
            row_steps += rows * steps
            calls += 1
            new_logprobs = recorder.finish(new).tolist() if recorder is not None else None
            for j, r in enumerate(active):  # a stopped row keeps its padded tail: stop_positions cuts it
                outputs[r] += new[j].tolist()
                if new_logprobs is not None:
                    logprobs[r] += new_logprobs[j]
            running = (~criterion.finished).nonzero().flatten()
            active = [active[j] for j in running.tolist()]
            budget -= steps
            if active and budget > 0:  # the cache holds all but each row's last token: generate feeds that one
                cache.batch_select_indices(running)
                call_mask = call_mask.repeat_interleave(len(out) // len(call_mask), 0)[running]
                call_ids, call_mask = out[running], F.pad(call_mask, (0, steps), value=1)
            extra = {}
    model.train(was_training)
    if stats is not None:
        stats.update(row_steps=row_steps, calls=calls,
                     tokens=sum(int(stop_positions(torch.tensor([o or [pad_token_id]]), stop_token_ids,
                                                   stop_strings, tokenizer)[0]) for o in outputs))
    width = max(max((len(o) for o in outputs), default=0), 1)
    if recorder is not None:
        logprobs_out["logprobs"] = torch.tensor([x + [0.0] * (width - len(x)) for x in logprobs])
    return torch.tensor([o + [pad_token_id] * (width - len(o)) for o in outputs], dtype=torch.long,
                        device=prompt_ids.device)


def rollout_experience(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                       sampler_logprobs: torch.Tensor | None, num_generations: int, stop_token_ids: list[int],
                       stop_strings: list[str] | None, tokenizer) -> tuple[Experience, list[str]]:
    """The experience batch (no rewards yet) of sampled responses, (B * G, R) ids grouped by prompt as
    `generate_responses` returns them, and their texts: each response cut at its first stop (`stop_positions`),
    padding after it; each prompt's responses one group."""
    lengths, truncated = stop_positions(response_ids, stop_token_ids, stop_strings, tokenizer)
    width = int(lengths.max())
    mask = response_mask_from_lengths(lengths, width)
    response_ids = torch.where(mask.bool(), response_ids[:, :width], tokenizer.pad_token_id)  # nothing after a stop
    texts = tokenizer.batch_decode([ids[:n] for ids, n in zip(response_ids.tolist(), lengths.tolist(), strict=True)],
                                   skip_special_tokens=True)
    exp = Experience(prompt_ids=prompt_ids.repeat_interleave(num_generations, 0),
                     prompt_mask=prompt_mask.repeat_interleave(num_generations, 0),
                     response_ids=response_ids, response_mask=mask, truncated=truncated,
                     group_ids=torch.arange(len(prompt_ids)).repeat_interleave(num_generations),
                     sampler_logprobs=None if sampler_logprobs is None else sampler_logprobs[:, :width] * mask)
    return exp, texts


def groups_experience(prompts: list[list[int]], responses: list[list[list[int]]], truncated: list[list[bool]],
                      rewards: list[list[float]], pad_token_id: int, device,
                      sampler_logprobs: list[list[list[float]]] | None = None) -> Experience:
    """An experience batch from groups given as token id lists: group g is `prompts[g]` with its samples
    `responses[g]` (each without padding), their truncation flags, rewards and, if given, the sampler's
    log-probs of their tokens; rows in group order."""
    samples = len(responses[0])
    flat = [r for group in responses for r in group]
    lengths = torch.tensor([len(r) for r in flat])
    response_ids = torch.full((len(flat), max(int(lengths.max()), 1)), pad_token_id, dtype=torch.long)
    for k, r in enumerate(flat):
        response_ids[k, :len(r)] = torch.tensor(r, dtype=torch.long)
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
    sampler = None
    if sampler_logprobs is not None:
        sampler = torch.zeros(response_ids.shape)
        for k, x in enumerate(x for group in sampler_logprobs for x in group):
            sampler[k, :len(x)] = torch.tensor(x)
    return Experience(prompt_ids=prompt_ids.repeat_interleave(samples, 0).to(device),
                      prompt_mask=prompt_mask.repeat_interleave(samples, 0).to(device),
                      response_ids=response_ids.to(device),
                      response_mask=response_mask_from_lengths(lengths, response_ids.shape[1]).to(device),
                      truncated=torch.tensor([t for group in truncated for t in group], device=device),
                      group_ids=torch.arange(len(prompts), device=device).repeat_interleave(samples),
                      rewards=torch.tensor([x for group in rewards for x in group], device=device),
                      sampler_logprobs=None if sampler is None else sampler.to(device))


def deal_groups(rounds: list, *, rank: int, world: int, per_step: int, pad_token_id: int, device):
    """Dynamic sampling's batch from its rounds of (exp, texts, drawn records, stats, repetition flags, signal,
    correct) per process: every process's groups are gathered, ordered by (round, place among all processes'
    prompts), the first `per_step` with signal are taken, topped up with groups without signal if too few,
    and each process keeps its share in that order: the same batch for 1 and N processes. Returns this
    process's (exp, texts, drawn, repetition flags, correct flags) and the batch's share of groups with signal."""
    from accelerate.utils import gather_object

    local, groups = per_step // world, []
    for r, (exp, texts, drawn, _, repetitive, signal, correct) in enumerate(rounds):
        samples = int((exp.group_ids == exp.group_ids[0]).sum())
        lengths = exp.response_mask.sum(dim=1).long()
        for g in range(len(exp.rewards) // samples):
            rows = range(g * samples, (g + 1) * samples)
            groups.append({
                "order": (r, rank * local + g), "signal": bool(signal[rows[0]]),
                "prompt": exp.prompt_ids[rows[0]][exp.prompt_mask[rows[0]].bool()].tolist(),
                "responses": [exp.response_ids[i, :lengths[i]].tolist() for i in rows],
                "sampler": None if exp.sampler_logprobs is None else
                           [exp.sampler_logprobs[i, :lengths[i]].tolist() for i in rows],
                "truncated": [bool(exp.truncated[i]) for i in rows], "rewards": [float(exp.rewards[i]) for i in rows],
                "texts": [texts[i] for i in rows], "drawn": drawn[rows[0]],
                "repetitive": [bool(repetitive[i]) for i in rows], "correct": [bool(correct[i]) for i in rows]})
    everyone = sorted(gather_object(groups), key=lambda g: g["order"])
    batch = [g for g in everyone if g["signal"]][:per_step]
    batch += [g for g in everyone if not g["signal"]][:per_step - len(batch)]
    mine = batch[rank * local:(rank + 1) * local]
    exp = groups_experience([g["prompt"] for g in mine], [g["responses"] for g in mine],
                            [g["truncated"] for g in mine], [g["rewards"] for g in mine], pad_token_id, device,
                            None if mine[0]["sampler"] is None else [g["sampler"] for g in mine])
    rows = [(g, i) for g in mine for i in range(len(g["responses"]))]
    return (exp, [g["texts"][i] for g, i in rows], [g["drawn"] for g, i in rows],
            torch.tensor([g["repetitive"][i] for g, i in rows], device=device), [g["correct"][i] for g, i in rows],
            sum(g["signal"] for g in batch) / len(batch))


def stop_positions(response_ids: torch.Tensor, stop_token_ids: list[int],
                   stop_strings: list[str] | None = None, tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Length of each response up to and including its first stop, and whether it was truncated.

    A stop is a stop token id or the token that completes a stop string (kept in the output, as ORZ
    does). The mask is never derived from `== pad_id`: pad may equal EOS, and the EOS would be masked out.
    Returns lengths (B,) long and truncated (B,) bool.
    """
    B, R = response_ids.shape
    is_stop = torch.isin(response_ids, torch.tensor(stop_token_ids, device=response_ids.device))
    has_stop = is_stop.any(dim=1)
    lengths = torch.where(has_stop, is_stop.float().argmax(dim=1) + 1, torch.full_like(has_stop, R, dtype=torch.long))
    if stop_strings:
        for i in range(B):
            ids = response_ids[i, :lengths[i]].tolist()
            if any(s in tokenizer.decode(ids) for s in stop_strings):
                lo, hi = 1, len(ids)  # smallest prefix whose text holds a stop string: containment is monotone
                while lo < hi:
                    mid = (lo + hi) // 2
                    if any(s in tokenizer.decode(ids[:mid]) for s in stop_strings):
                        hi = mid
                    else:
                        lo = mid + 1
                lengths[i] = lo
                has_stop[i] = True
    # No stop anywhere means generation ran out of max_new_tokens: the response was cut off.
    return lengths, ~has_stop


def response_mask_from_lengths(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).float()


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool = False,
                         entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-prob of `tokens` under softmax(logits / T), in fp32 and in row chunks.

    Dividing by the sampling temperature makes these the log-probs of the distribution that was
    sampled. logits (B, R, V), tokens (B, R) -> (B, R), and entropy (B, R) if asked.
    The entropy carries a gradient only with `entropy_grad`: otherwise autograd would keep one more
    (B, R, V) tensor alive until the backward pass, as much memory as the logits, just to log a number.
    """
    out, ent = [], []
    for rows in torch.split(torch.arange(logits.shape[0], device=logits.device), LOGIT_CHUNK):
        chunk = logits[rows].float() / (temperature if temperature > 0 else 1.0)
        logp = chunk.log_softmax(dim=-1)
        out.append(logp.gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1))
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ent.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out), (torch.cat(ent) if with_entropy else None)


class ChunkedLogprobs(torch.autograd.Function):
    """Log-prob of each token and the entropy of its distribution under softmax(hidden @ weight.T / T), one
    chunk of `chunk` tokens at a time, in fp32: hidden (N, H), weight (V, H), tokens (N,) -> (N, 2) holding
    [log-prob, entropy] per token.

    Only one chunk of (chunk, V) logits exists at a time, in the forward and in the backward, which
    recomputes each chunk's logits from the saved hidden states and weight instead of keeping them: the
    logits of all tokens (N x V x 4 bytes, 3.2 GB for 16 x 1024 tokens of a 49K vocabulary, and the
    autograd graph held about three times that) never exist. The matrix products run under the autocast
    state of the forward, as the model's own LM head would.

    The gradients, with z = logits / T, p = softmax(z), lse = logsumexp(z) and entropy H = lse - sum(p z):
    d log p[tok] / dz = onehot(tok) - p, and dH/dz = -p (z - lse + H).
    """

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature: float, chunk: int):
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        out = torch.empty((hidden.shape[0], 2), dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):  # in place where it can be: two (chunk, V) tensors at most
            logp = F.linear(hidden[s:s + chunk], weight).float().div_(temperature)
            lse[s:s + chunk] = logp.logsumexp(-1)
            logp.sub_(lse[s:s + chunk, None])
            out[s:s + chunk, 0] = logp.gather(-1, tokens[s:s + chunk, None]).squeeze(-1)
            out[s:s + chunk, 1] = -logp.exp().mul_(logp).sum(-1)
        ctx.save_for_backward(hidden, weight, tokens, lse, out[:, 1].clone())
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, tokens, lse, entropy = ctx.saved_tensors
        device, autocast, autocast_dtype = ctx.autocast
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        with_entropy = bool(grad_out[:, 1].any())  # 0 when the entropy is only logged
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s:s + ctx.chunk]
            with torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
                logits = F.linear(h, weight)
            dtype = logits.dtype
            logp = logits.float().div_(ctx.temperature).sub_(lse[s:s + ctx.chunk, None])  # in place, as above
            del logits
            p = logp.exp()
            g = grad_out[s:s + ctx.chunk]
            if with_entropy:  # logp becomes the entropy's part of the gradient
                logp.add_(entropy[s:s + ctx.chunk, None]).mul_(p).mul_(-g[:, 1:])
            grad_z = p.mul_(-g[:, :1])
            if with_entropy:
                grad_z.add_(logp)
            del logp
            grad_z.scatter_add_(-1, tokens[s:s + ctx.chunk, None], g[:, :1])
            grad_logits = grad_z.div_(ctx.temperature).to(dtype)  # as the autocast LM head's backward
            if want_hidden:
                grad_hidden[s:s + ctx.chunk] = (grad_logits @ weight.to(dtype)).to(hidden.dtype)
            if want_weight:
                grad_weight += (grad_logits.T @ h.to(dtype)).float()
        return grad_hidden, (grad_weight.to(weight.dtype) if want_weight else None), None, None, None


def output_head(model) -> torch.nn.Linear | None:
    """The LM head of `model` (through DDP's and DeepSpeed's `.module`) if ChunkedLogprobs can stand in for
    it: a bias-free Linear whose output the model returns as logits unchanged; else None."""
    inner = model
    while isinstance(getattr(inner, "module", None), torch.nn.Module):
        inner = inner.module
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner, "config", None)
    changes_logits = any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale"))
    if (not isinstance(head, torch.nn.Linear) or head.bias is not None or changes_logits
            or getattr(inner, "reasoner_zero_changes_head_output", False)):
        return None
    return head


def forward_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                     temperature: float, with_entropy: bool = False, entropy_grad: bool = False,
                     logit_chunk: int = LOGIT_CHUNK_ELEMENTS, share_prompts: bool = False):
    """Log-probs (and entropy) of the last `response_len` tokens of each row under `model`.

    Positions are computed from the mask exactly as `generate` computes them (a plain forward would count
    the left padding as positions). (B, P+R) -> (B, R), and entropy (B, R) if asked, with a gradient only
    with `entropy_grad`.

    The LM head runs as ChunkedLogprobs, at most `logit_chunk` logits at a time: for that one call its
    `forward` is replaced, so that the model's own forward (and the hooks FSDP and DeepSpeed set on it,
    which gather sharded weights) runs as usual. `logit_chunk` 0, or a head ChunkedLogprobs cannot replace
    (`output_head`), takes the logits of all response tokens at once (`logprobs_from_logits`).

    `share_prompts`: rows whose prompt columns (ids and mask) are equal, a group's samples, share one forward
    pass of that prompt: the distinct prompts run first, and each row's response runs on its prompt's keys
    and values (the cache, picked per row by an index_select that backpropagates into the prompt's pass), as
    `generate` computed them. The same log-probs to float rounding, for about (G - 1) / G fewer prompt
    tokens with G samples per prompt. Needs a KV cache in training: not with gradient checkpointing.
    """
    tokens = input_ids[:, -response_len:]
    head = output_head(model) if logit_chunk else None
    prompt_len = input_ids.shape[1] - response_len
    inverse = None
    if share_prompts and head is not None and prompt_len > 0:
        distinct, inverse = torch.unique(torch.cat([input_ids[:, :prompt_len], attention_mask[:, :prompt_len]], 1),
                                         dim=0, return_inverse=True)
        inverse = inverse if len(distinct) < len(input_ids) else None  # nothing to share
    if head is not None:
        chunk = max(1, logit_chunk // head.out_features)

        given, prompt_last = [], []

        def head_forward(hidden):  # (B, R + 1, H) -> (B, R, 2): log-prob and entropy per response token
            if inverse is not None and not prompt_last:  # the distinct prompts' last positions, (U, 1, H)
                prompt_last.append(hidden)
                return hidden
            if inverse is not None:  # (B, R, H) of the responses: the first token is predicted by the prompt
                hidden = torch.cat([prompt_last[0][inverse], hidden], dim=1)
            flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            out = ChunkedLogprobs.apply(flat, head.weight, tokens.reshape(-1), temperature or 1.0, chunk)
            given.append(out.view(*tokens.shape, 2))
            return given[-1]

        head.forward = head_forward
    try:
        if inverse is None:
            out = model(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids_from_mask(attention_mask),
                        logits_to_keep=response_len + 1, use_cache=False).logits
        else:
            ids, mask = distinct[:, :prompt_len], distinct[:, prompt_len:]
            cache = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                          logits_to_keep=1, use_cache=True).cache
            if cache is None:
                raise RuntimeError("share_prompts needs the model's KV cache in training: not with gradient "
                                   "checkpointing")
            cache.reorder_cache(inverse)  # row b gets prompt inverse[b]'s keys and values
            out = model(input_ids=input_ids[:, prompt_len:], attention_mask=attention_mask,
                        position_ids=position_ids_from_mask(attention_mask)[:, prompt_len:], cache=cache,
                        logits_to_keep=response_len, use_cache=True).logits
    finally:
        if head is not None:
            del head.forward
    if head is not None and not (out is given[-1] or torch.equal(out, given[-1])):
        # The model changed what its head gave (a scaling such as Granite's logits_scaling or FalconH1's
        # lm_head_multiplier, a softcap): the chunks' log-probs would be of other logits. This model's
        # log-probs come from its full logits from now on, this call included.
        inner = model
        while isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module
        inner.reasoner_zero_changes_head_output = True
        warnings.warn(f"{type(inner).__name__} transforms its LM head's output (a logit scaling or softcap): "
                      "its log-probs are computed from the full logits, not in chunks", stacklevel=2)
        return forward_logprobs(model, input_ids, attention_mask, response_len, temperature, with_entropy,
                                entropy_grad, logit_chunk, share_prompts)
    if head is None:
        return logprobs_from_logits(out[:, :-1], tokens, temperature, with_entropy, entropy_grad)
    entropy = out[..., 1] if entropy_grad and torch.is_grad_enabled() else out[..., 1].detach()
    return out[..., 0], (entropy if with_entropy else None)


@torch.no_grad()
def batched_logprobs(model, exp: Experience, temperature: float, micro_batches: list[torch.Tensor],
                     share_prompts: bool = False) -> torch.Tensor:
    """`forward_logprobs` over the whole batch (`Experience.per_token`), without grad: the old and
    reference log-probs. Returns (B, R), 0 outside the response mask."""
    return exp.per_token(micro_batches, lambda mb: forward_logprobs(
        model, mb.input_ids, mb.attention_mask, mb.response_ids.shape[1], temperature,
        share_prompts=share_prompts)[0])


# --------------------------------------------------------------------------------------------------
# Which rows a process takes: the step's prompts, the generate calls' seeds, the update's mini-batches. Each
# is a pure function of (seed, step, place among all processes' rows), so 1 and N processes, and a resumed
# run, see the same.
# --------------------------------------------------------------------------------------------------

def step_prompts(records: list, step: int, per_step: int, seed: int, rank: int, world: int,
                 weights: torch.Tensor | None = None) -> list:
    """This process's share of the prompts of `step`: a fresh permutation per epoch, a pure function of
    (step, seed), so a resumed run sees the same prompts. A step may draw a record twice (a dataset
    smaller than `per_step`, or a step across the end of an epoch); `rollout` makes each draw its own
    group. With `weights` (one per record: the curriculum's) the step's prompts are drawn in proportion to
    them, without replacement while there are enough records, seeded by (seed, step)."""
    local = per_step // world
    if weights is not None:
        generator = torch.Generator().manual_seed(seed * 100003 + step)
        drawn = torch.multinomial(weights, per_step, replacement=per_step > len(records), generator=generator)
        return [records[i] for i in drawn[rank * local:(rank + 1) * local].tolist()]
    chosen = []
    for g in range(step * per_step + rank * local, step * per_step + (rank + 1) * local):
        epoch, pos = divmod(g, len(records))
        perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        chosen.append(records[perm[pos]])
    return chosen


def call_seeds(seed: int, step: int, first: int, count: int, chunk: int, salt: int = 0) -> list[int]:
    """One seed per generate call of `chunk` prompts, from the run's seed, the step and the place of the
    call's first prompt among all processes' prompts of the step: independent of the process count."""
    return [(seed * 1_000_003 + salt * 7_919 + step * 100_003 + first + i) % 2**62 for i in range(0, count, chunk)]


def mini_batch_parts(total: int, mini_batches: int, seed: int, step: int, epochs: int = 1) -> list[torch.Tensor]:
    """The global rows of each mini-batch, epoch after epoch: a fresh shuffle per epoch, seeded by
    (seed, step). Mini-batches are drawn from the rows of all processes (process r holds global rows
    r*rows ..), so they hold the same rows whatever the process count."""
    generator = torch.Generator().manual_seed(seed * 1000 + step)
    parts = []
    for _ in range(epochs):
        order = torch.randperm(total, generator=generator) if mini_batches > 1 else torch.arange(total)
        parts += list(order.chunk(mini_batches))
    return parts


def local_rows(part: torch.Tensor, rank: int, rows: int) -> torch.Tensor:
    """This process's rows of a mini-batch of global rows, as indices into its own batch."""
    return part[(part >= rank * rows) & (part < (rank + 1) * rows)] - rank * rows


def padding_fraction(exp: Experience, micro: list[torch.Tensor]) -> float:
    """Share of the tokens computed in `micro` that are padding (trimmed micro-batches)."""
    computed = sum(len(idx) * exp.select(idx).trim().input_ids.shape[1] for idx in micro if len(idx))
    return 1.0 - exp.attention_mask.sum().item() / max(computed, 1)
