"""CausalLMLogps with a shared prefix (one prompt forward per group, its KV cache gathered for
the group's rows) gives the log-probs and gradients of the plain forward."""

import torch

from tether.engine.generate import SamplingParams, TorchBackend, encode_prompt
from tether.engine.logprobs import CausalLMLogps
from tether.engine.models import tiny_llama


def test_shared_prefix_equals_plain_forward(default_tokenizer):
    model = tiny_llama(vocab_size=len(default_tokenizer), hidden_size=64, tie=True,
                       pad_token_id=default_tokenizer.pad_token_id, seed=1)
    policy = CausalLMLogps(model, chunk_size=7)
    prompts = [encode_prompt(default_tokenizer, p) for p in ("What is 2 + 3?", "Hi", "Say a b c")]
    r = TorchBackend(policy, default_tokenizer).generate(
        prompts, SamplingParams(max_new_tokens=5, group_size=3),
        generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([0, 1, 2, 4, 6, 7, 8])  # groups of 3, 1 and 3 rows (some rows left out)
    ids, mask, pos = r.input_ids()[rows], r.attention_mask()[rows], r.position_ids()[rows]
    mask[:, -1] = False  # a padded completion position
    P = r.prompt_ids.shape[1]
    weights = torch.randn(len(rows), ids.shape[1] - P, generator=torch.Generator().manual_seed(1))

    def run(**kw):
        policy.zero_grad()
        out = policy(ids, mask, pos, start=P, **kw)  # (7, C)
        (out * weights * mask[:, P:]).sum().backward()
        return out.detach(), [p.grad.clone() for p in policy.parameters()]

    plain, plain_grads = run()
    shared, shared_grads = run(shared_prefix=rows // 3)
    keep = mask[:, P:]
    torch.testing.assert_close(shared[keep], plain[keep], atol=1e-5, rtol=0)
    for g, h in zip(plain_grads, shared_grads):
        torch.testing.assert_close(h, g, atol=1e-5, rtol=1e-4)
