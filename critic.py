"""The critic of PPO: the value model and its forward passes (GAE and the value loss are in algos.py).

The value model is the policy's base checkpoint (its transformer backbone, fully fine-tuned) plus a
bias-free linear head from the last hidden state to one value per token, as in Open-Reasoner-Zero
(arXiv:2503.24290v2, sec. 2.2; their code, commit 3fdd9a0, initialises the head N(0, 1/(hidden+1))).

Save and load it (the head is a separate safetensors file next to the backbone, so the shapes always
match, unlike the released ORZ critics: their issue #63):

    critic.save_pretrained("run/critic")
    critic = ValueModel.from_pretrained("run/critic")
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from utils import lora_scaling, merge_lora_state_dict, position_ids_from_mask

HEAD_FILE = "value_head.safetensors"


class ValueModel(nn.Module):
    """Backbone (an `AutoModel`) + `Linear(hidden, 1, bias=False)`; forward gives (B, T) values."""

    def __init__(self, backbone: nn.Module, init_head: bool = True):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.value_head = nn.Linear(hidden, 1, bias=False)
        if init_head:
            # ORZ's code: std = 1 / (hidden + 1); the paper's text says U(-sqrt5, sqrt5), the code is what ran.
            nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))

    @classmethod
    def from_base(cls, name_or_path: str, **load_kwargs) -> "ValueModel":
        """A fresh critic on a policy checkpoint: its backbone, and a new random head."""
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(name_or_path, **load_kwargs))

    @classmethod
    def from_pretrained(cls, path: str, **load_kwargs) -> "ValueModel":
        """Load a critic written by `save_pretrained` (backbone and head, both safetensors)."""
        from transformers import AutoModel

        adapter = Path(path) / "adapter_config.json"
        if adapter.exists():  # a LoRA critic: peft's adapters on the base model they were trained on
            from peft import PeftConfig, PeftModel

            base = AutoModel.from_pretrained(PeftConfig.from_pretrained(path).base_model_name_or_path, **load_kwargs)
            model = cls(PeftModel.from_pretrained(base, path), init_head=False)
        else:
            model = cls(AutoModel.from_pretrained(path, **load_kwargs), init_head=False)
        model.value_head.load_state_dict(load_file(str(Path(path) / HEAD_FILE)))
        return model

    def save_pretrained(self, path: str, state_dict: dict | None = None, is_main_process: bool = True,
                        merge_lora: bool = False, **kwargs) -> None:
        """The backbone as a Hugging Face model directory and the head as value_head.safetensors. Under
        several processes every one calls this with `is_main_process`, and only the main one writes: a
        gathered (FSDP) `state_dict` is empty on the others. A LoRA backbone (peft) is saved as its adapters,
        or with `merge_lora` as a plain model with the adapters merged into its weights."""
        state_dict = state_dict if state_dict is not None else self.state_dict()
        backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        saver = self.backbone
        if merge_lora:
            backbone = merge_lora_state_dict(backbone, lora_scaling(self.backbone))
            saver = self.backbone.get_base_model()
        saver.save_pretrained(path, state_dict=backbone, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            save_file({"weight": state_dict["value_head.weight"].contiguous()}, str(Path(path) / HEAD_FILE))

    def gradient_checkpointing_enable(self, **kwargs):
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, values_to_keep: int = 0):
        """Values of the last `values_to_keep` positions (all when 0). (B, T) -> (B, values_to_keep)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        if values_to_keep:
            hidden = hidden[:, -values_to_keep:]
        # a copy, not a view of the head's output: FSDP2 hooks a model's output for its backward pass
        # (a bf16 backbone, LoRA with --bf16, feeds the fp32 head in fp32)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float().clone()


def forward_values(critic, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int):
    """V(s_t) for each response token t: the value read at the state before it (the same shift as the
    log-probs: the output at column t belongs to token t+1). (B, P+R) -> (B, R)."""
    return critic(input_ids, attention_mask, values_to_keep=response_len + 1)[:, :-1]


@torch.no_grad()
def batched_values(critic, exp, micro_batches: list[torch.Tensor]) -> torch.Tensor:
    """`forward_values` over a whole rollout (`rollout.Experience.per_token`), in eval mode (then back to
    the critic's mode) and without grad: the values GAE and the clipped value loss start from. (B, R), 0
    outside the response mask."""
    training = critic.training
    critic.eval()
    values = exp.per_token(micro_batches, lambda mb: forward_values(
        critic, mb.input_ids, mb.attention_mask, mb.response_ids.shape[1]))
    critic.train(training)
    return values

