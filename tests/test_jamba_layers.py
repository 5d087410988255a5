"""Mixture-of-experts routing and the training path of the whole model."""

import torch
import torch.nn.functional as F

from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.models.jamba.moe import JambaSparseMoeBlock, load_balancing_loss


def _dense_moe_reference(block: JambaSparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """Every expert over every token, weighted by its (unrenormalised) top-k probability or zero."""
    probs = torch.softmax(block.router(x).float(), dim=-1)
    top = torch.topk(probs, block.top_k, dim=-1)
    weights = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
    return sum(weights[:, e : e + 1] * expert(x) for e, expert in enumerate(block.experts))


def test_sorted_dispatch_equals_dense_reference():
    cfg = JambaConfig.from_preset("jamba-tiny", num_experts=5, num_experts_per_tok=2)
    block = JambaSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    for n in (37, 1):  # many tokens (sorted dispatch) and one token (the decoding path)
        x = torch.randn(n, cfg.hidden_size)
        out, logits = block(x)
        torch.testing.assert_close(out, _dense_moe_reference(block, x), atol=1e-5, rtol=1e-5)
        assert logits.shape == (n, 5)


def test_top_k_weights_are_not_renormalised():
    cfg = JambaConfig.from_preset("jamba-tiny", num_experts=4, num_experts_per_tok=1)
    block = JambaSparseMoeBlock(cfg)
    x = torch.randn(9, cfg.hidden_size)
    for expert in block.experts:  # every expert the identity-ish map: out = weight * same value
        torch.nn.init.zeros_(expert.down_proj.weight)
        expert.down_proj.weight.data[:, 0] = 1.0
        torch.nn.init.constant_(expert.gate_proj.weight, 0.0)
        expert.gate_proj.weight.data[0] = 10.0
        torch.nn.init.constant_(expert.up_proj.weight, 0.0)
        expert.up_proj.weight.data[0] = 1.0
    out, logits = block(x)
    single = block.experts[0](x)
    top1 = torch.softmax(logits, -1).max(-1).values
    torch.testing.assert_close(out, single * top1[:, None])
    assert (top1 < 1).all()


def test_aux_loss_is_minimal_for_uniform_routing():
    uniform = [torch.zeros(12, 4)]
    # all probabilities 1/4; ties broken by topk, counts then sum to k per token
    assert abs(float(load_balancing_loss(uniform, 4, 2)) - 2.0) < 1e-6
    skewed = [torch.tensor([[5.0, 4.0, 0.0, 0.0]]).repeat(12, 1)]
    assert float(load_balancing_loss(skewed, 4, 2)) > 2.0


def test_loss_backpropagates_into_every_parameter_and_decreases():
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny"))
    ids = torch.randint(3, 1024, (4, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(ids, labels=ids, output_router_logits=True)
        opt.zero_grad()
        out.loss.backward()
        losses.append(out.loss.item())
        opt.step()
    unused = [n for n, p in model.named_parameters() if p.grad is None and "padding" not in n]
    assert unused == []
    assert losses[-1] < losses[0] - 0.5
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 1024), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce + 0.001 * out.aux_loss, atol=1e-4, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny"))
    ids = torch.randint(3, 1024, (2, 16))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if name in plain:
            torch.testing.assert_close(p.grad, plain[name], msg=name)
