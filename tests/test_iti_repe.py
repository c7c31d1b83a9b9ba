"""ITI (probes per head, mass-mean shift, alpha tuning) and RepE reading vectors on a model where the answer is known.

The model: a float64 multi-head Llama whose layer 0 is edited so that the class of a text (its first
character, "P" or "N") reaches layer 0's head outputs through one head only:

* the embeddings of "P" and "N" are ``+c·v`` and ``-c·v`` (same norm, so RMSNorm scales both alike),
  and every other embedding has ``v`` projected out;
* every head's query and key projections, and the value projections of every head but ``TARGET``,
  have ``v`` projected out: attention patterns and the other heads' outputs do not depend on the class;
* ``TARGET``'s value projection reads ``v`` strongly, and layer 0's MLP output is zero.

Texts come in pairs with the same suffix. At layer 0 the pair difference of ``TARGET``'s last-token
output is a positive multiple of ``u = W_V[TARGET] · v`` (the class token's attention weight, the
only thing that varies, is positive), and the block output's is a positive multiple of
``W_O[:, TARGET] · u``. The other heads' outputs are identical within a pair (up to ~1e-9: Llama's
RMSNorm rounds to float32, so ``v`` is projected out only to float32 precision), so their probes are
at chance: with pairs kept together in the split, exactly one of each validation pair is right.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from tiny_models import tiny_model
from tiny_tokenizer import VOCAB, tiny_tokenizer

import reftlib
from reftlib.collect import collect_activations
from reftlib.errors import ArgumentTypeError, InputError, ReftConfigError
from reftlib.evaluation import TruthfulQAExample, truthfulqa_mc
from reftlib.lofit import (
    ItiProbes,
    ReadingVectors,
    apply_iti,
    apply_repe,
    fit_linear_probes,
    iti_config,
    iti_probe_heads,
    repe_config,
    repe_reading_vectors,
    tune_iti_alpha,
    tune_repe_alpha,
)

TARGET = 2
HEADS, HEAD_DIM, HIDDEN = 4, 8, 32
N_PAIRS = 24


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


@torch.no_grad()
def engineered_model():
    config = tf.LlamaConfig(vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
                            num_key_value_heads=HEADS, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float64).eval()
    v = torch.randn(HIDDEN, dtype=torch.float64)
    v /= v.norm()
    emb = model.get_input_embeddings().weight
    emb -= (emb @ v).unsqueeze(1) * v  # no other token carries v
    emb[VOCAB["P"]] = 0.5 * v
    emb[VOCAB["N"]] = -0.5 * v
    attn = model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        rows = slice(None) if proj is not attn.v_proj else [i for i in range(HEADS * HEAD_DIM)
                                                             if i // HEAD_DIM != TARGET]
        w = proj.weight[rows]
        proj.weight[rows] = w - (w @ v).unsqueeze(1) * v
    target_rows = slice(TARGET * HEAD_DIM, (TARGET + 1) * HEAD_DIM)
    attn.v_proj.weight[target_rows] += 2.0 * torch.randn(HEAD_DIM, 1, dtype=torch.float64) * v
    model.model.layers[0].mlp.down_proj.weight.zero_()
    u = attn.v_proj.weight[target_rows] @ v
    w_out = attn.o_proj.weight[:, target_rows] @ u
    return model, u, w_out


def paired_texts(n=N_PAIRS, seed=0):
    rng = random.Random(seed)
    suffixes = ["".join(rng.choice("abcdefghijklm") for _ in range(rng.randint(3, 9))) for _ in range(n)]
    return ["P" + s for s in suffixes], ["N" + s for s in suffixes]


@pytest.fixture(scope="module")
def setup():
    model, u, w_out = engineered_model()
    tok = tiny_tokenizer("llama")
    pos, neg = paired_texts()
    groups = list(range(N_PAIRS)) * 2
    probes = iti_probe_heads(model, tok, pos, neg, layers=[0], groups=groups, val_fraction=0.25, seed=1,
                             progress=False)
    return SimpleNamespace(model=model, tok=tok, pos=pos, neg=neg, u=u, w_out=w_out, probes=probes)


def hook_snapshot(model):
    return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}


# --------------------------------------------------------------------------- probes
def test_linear_probes_match_a_hand_checked_problem():
    """Two Gaussian clouds split by the sign of the first coordinate: the probe finds that axis and the
    regularized optimum's gradient is zero (L-BFGS converged)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 200, 3, generator=g, dtype=torch.float64)
    x[0, :, 0] += torch.where(torch.arange(200) < 100, 3.0, -3.0)
    labels = (torch.arange(200) < 100).double()
    weights, biases = fit_linear_probes(x, labels)
    assert cos(weights[0], torch.tensor([1.0, 0, 0], dtype=torch.float64)) > 0.95
    preds = (torch.einsum("pnd,pd->pn", x, weights) + biases.unsqueeze(1)) > 0
    assert (preds[0] == labels.bool()).double().mean() > 0.97
    w, b = weights.clone().requires_grad_(), biases.clone().requires_grad_()
    logits = torch.einsum("pnd,pd->pn", x, w) + b.unsqueeze(1)
    loss = torch.nn.functional.softplus(-(2 * labels - 1) * logits).mean(1) + 0.5 / 200 * w.pow(2).sum(1)
    loss.sum().backward()
    assert float(w.grad.abs().max()) < 1e-7 and float(b.grad.abs().max()) < 1e-7


def test_probe_finds_the_separating_head(setup):
    probes = setup.probes
    assert isinstance(probes, ItiProbes)
    assert probes.accuracies.shape == (3, HEADS) and probes.directions.shape == (3, HEADS, HEAD_DIM)
    assert probes.accuracies[0, TARGET] == 1.0
    others = [h for h in range(HEADS) if h != TARGET]
    # Identical features within each validation pair: exactly one of the two is classified right.
    assert probes.accuracies[0, others].tolist() == [0.5] * len(others)
    assert torch.isnan(probes.accuracies[1:]).all()  # layers not probed
    assert probes.ranking()[0] == (0, TARGET) and len(probes.ranking()) == HEADS
    assert probes.top(1) == [(0, TARGET)]
    assert probes.settings["val_examples"] == 12 and probes.settings["train_examples"] == 36


def test_direction_and_sigma_follow_the_construction(setup):
    model, tok, pos, neg, u, probes = setup.model, setup.tok, setup.pos, setup.neg, setup.u, setup.probes
    # Every pair difference is a positive multiple of u: so is their mean, the mass-mean shift.
    assert cos(probes.directions[0, TARGET], u) > 1 - 1e-12
    torch.testing.assert_close(probes.directions[0, TARGET].norm(), torch.tensor(1.0, dtype=torch.float64))
    acts = collect_activations(model, tok, pos + neg, [(0, "head_output")], progress=False)[(0, "head_output")]
    projections = acts[:, 0, TARGET] @ probes.directions[0, TARGET]
    torch.testing.assert_close(probes.sigmas[0, TARGET], projections.std(correction=0), rtol=1e-12, atol=0)


def test_apply_iti_adds_alpha_sigma_direction_at_every_token(setup):
    model, tok, pos, probes = setup.model, setup.tok, setup.pos, setup.probes
    before = hook_snapshot(model)
    base = collect_activations(model, tok, pos[:6], [(0, "head_output")], "all", progress=False)
    reft_model = apply_iti(model, probes, k=1, alpha=3.0)
    try:
        (iv,) = reft_model.interventions.values()
        assert isinstance(iv, reftlib.HeadBiasIntervention) and iv.heads == [TARGET]
        assert reft_model.reft_config.representations[0].positions is None
        steered = collect_activations(reft_model, tok, pos[:6], [(0, "head_output")], "all", progress=False)
    finally:
        reft_model.detach()
    assert hook_snapshot(model) == before
    offset = 3.0 * probes.sigmas[0, TARGET] * probes.directions[0, TARGET]
    expected = base[(0, "head_output")].clone()
    expected[:, :, TARGET] += offset * base.mask.unsqueeze(-1)
    torch.testing.assert_close(steered[(0, "head_output")], expected, rtol=0, atol=1e-15 * float(offset.norm()))


def test_iti_config_options_and_errors(setup):
    probes = setup.probes
    config = iti_config(probes, heads=[(0, 1), (0, TARGET)], alpha=2.0)
    (rep,) = config.representations
    assert rep.layer == 0 and rep.component == "head_output" and rep.intervention.heads == [1, TARGET]
    torch.testing.assert_close(rep.intervention.bias[1].double(), probes.offset(0, TARGET, 2.0), rtol=1e-6, atol=0)
    assert len(iti_config(probes, fraction=0.5, alpha=1.0).representations[0].intervention.heads) == HEADS
    with pytest.raises(ReftConfigError, match="not both"):
        iti_config(probes, 2, heads=[(0, 1)], alpha=1.0)
    with pytest.raises(ReftConfigError, match="number of probed heads"):
        iti_config(probes, 5, alpha=1.0)
    with pytest.raises(ReftConfigError, match="does not exist"):
        iti_config(probes, heads=[(0, 9)], alpha=1.0)
    with pytest.raises(ReftConfigError, match="finite number"):
        iti_config(probes, 1, alpha=float("nan"))
    with pytest.raises(ReftConfigError, match="ItiProbes"):
        iti_config({"heads": []}, 1, alpha=1.0)


def test_probe_argument_errors(setup):
    model, tok, pos, neg = setup.model, setup.tok, setup.pos, setup.neg
    with pytest.raises(ArgumentTypeError, match="wrap a single text"):
        iti_probe_heads(model, tok, "Pabc", neg)
    with pytest.raises(ArgumentTypeError, match="not a ReftModel"):
        iti_probe_heads(reftlib.ReftModel(tiny_model("llama")), tok, pos, neg)
    with pytest.raises(ReftConfigError, match="distinct layers from 0 to 2"):
        iti_probe_heads(model, tok, pos, neg, layers=[3])
    with pytest.raises(InputError, match="one key per text"):
        iti_probe_heads(model, tok, pos, neg, groups=[0, 1])
    with pytest.raises(InputError, match="both classes"):
        iti_probe_heads(model, tok, pos[:1], neg[:1], groups=[0, 0])
    with pytest.raises(ReftConfigError, match="val_fraction"):
        iti_probe_heads(model, tok, pos, neg, val_fraction=1.0)


# --------------------------------------------------------------------------- alpha tuning
def test_tune_iti_alpha_picks_the_best_alpha_and_leaves_the_model_clean(setup):
    model, tok, pos, probes = setup.model, setup.tok, setup.pos, setup.probes
    direction, sigma = probes.directions[0, TARGET], float(probes.sigmas[0, TARGET])

    def mean_projection(m):
        acts = collect_activations(m, tok, pos[:8], [(0, "head_output")], progress=False)[(0, "head_output")]
        return float((acts[:, 0, TARGET] @ direction).mean())

    goal = mean_projection(model) + 2 * sigma  # alpha = 2 moves every projection by exactly 2 sigma
    before = hook_snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    search = tune_iti_alpha(model, probes, lambda m: -abs(mean_projection(m) - goal), alphas=[0, 1, 2, 3], k=1)
    assert search.best_alpha == 2.0 and list(search.scores) == [0.0, 1.0, 2.0, 3.0]
    assert search.best_score == pytest.approx(0.0, abs=1e-12 * abs(goal))
    assert hook_snapshot(model) == before and [p.requires_grad for p in model.parameters()] == flags
    assert not model.training

    with pytest.raises(ReftConfigError, match="metric="):
        tune_iti_alpha(model, probes, lambda m: {"mc1": 0.0, "mc2": 1.0}, alphas=[0], k=1)
    with pytest.raises(ReftConfigError, match="finite numbers"):
        tune_iti_alpha(model, probes, lambda m: 0.0, alphas=[], k=1)
    assert hook_snapshot(model) == before


def test_alpha_is_tuned_with_the_truthfulqa_scorer(setup):
    """The scorer sees the ReftModel like any LoFiT model: alpha = 0 scores exactly like the base model."""
    model, tok, probes = setup.model, setup.tok, setup.probes
    rows = [TruthfulQAExample("Is it a P?", "yes", ["yes", "yes it is"], ["no", "never"]),
            TruthfulQAExample("Which letter?", "P", ["P"], ["N", "Q"])]
    search = tune_iti_alpha(model, probes, lambda m: truthfulqa_mc(m, tok, rows, progress=False),
                            alphas=[0, 10], k=1, metric="mc2")
    base = truthfulqa_mc(model, tok, rows, progress=False)
    assert search.results[0.0] == base
    assert search.scores[10.0] != base["mc2"]
    assert search.best_alpha in (0.0, 10.0)


# --------------------------------------------------------------------------- save, load, merge
def test_iti_saves_loads_and_merges_like_lofit(tmp_path):
    """GPT-2 computes in float64 throughout: merged (offsets folded into c_proj's bias) and hooked logits
    differ only by the order of float64 additions, far below 1e-12 of their scale."""
    model, tok = tiny_model("gpt2", dtype=torch.float64), tiny_tokenizer("llama")
    pos, neg = paired_texts(8, seed=3)
    probes = iti_probe_heads(model, tok, pos, neg, seed=0, progress=False)
    reft_model = apply_iti(model, probes, k=3, alpha=5.0)
    inputs = tok(["Pabc", "Nxyz de"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hooked = reft_model(**inputs).logits
        base = reft_model.model(**inputs).logits
    assert (hooked - base).abs().max() > 1e-3
    reft_model.save_pretrained(tmp_path / "iti")
    loaded = reftlib.ReftModel.from_pretrained(tmp_path / "iti", tiny_model("gpt2", dtype=torch.float64))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, hooked)
    merged = reft_model.merge_and_unload()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, hooked, rtol=0, atol=1e-12 * float(hooked.abs().max()))


# --------------------------------------------------------------------------- RepE
@pytest.mark.parametrize("method", ["mean_diff", "pca"])
def test_reading_vector_aligns_with_the_constructed_difference(setup, method):
    model, tok, pos, neg, w_out = setup.model, setup.tok, setup.pos, setup.neg, setup.w_out
    vectors = repe_reading_vectors(model, tok, pos, neg, layers=[0, 1], method=method, progress=False)
    assert isinstance(vectors, ReadingVectors) and vectors.method == method
    assert cos(vectors.vectors[0], w_out) > 1 - 1e-12  # sign included: pos - neg
    torch.testing.assert_close(vectors.vectors[0].norm(), torch.tensor(1.0, dtype=torch.float64))
    raw = repe_reading_vectors(model, tok, pos, neg, layers=[0], method=method, normalize=False, progress=False)
    acts = collect_activations(model, tok, pos + neg, [(0, "block_output")], progress=False)[(0, "block_output")][:, 0]
    # Each positive text reads higher than its pair; the midpoint rule is checked by its definition.
    proj = acts @ vectors.vectors[0]
    assert bool((proj[:N_PAIRS] > proj[N_PAIRS:]).all())
    middle = (proj[:N_PAIRS].mean() + proj[N_PAIRS:].mean()) / 2
    right = int((proj[:N_PAIRS] > middle).sum()) + int((proj[N_PAIRS:] < middle).sum())
    assert vectors.accuracies[0] == right / (2 * N_PAIRS) > 0.5
    mean_diff = acts[:N_PAIRS].mean(0) - acts[N_PAIRS:].mean(0)
    # Both methods keep the mean difference's scale along their direction (here: the whole difference).
    torch.testing.assert_close(raw.vectors[0], mean_diff, rtol=0, atol=1e-10 * float(mean_diff.norm()))


def test_pca_differs_from_mean_diff_when_pairs_vary_off_axis():
    """PCA follows the dominant axis of the paired differences; the mean difference follows their mean."""
    model, tok = tiny_model("gpt2", dtype=torch.float64), tiny_tokenizer("llama")
    pos, neg = paired_texts(10, seed=5)
    neg = [text[::-1] for text in neg]  # unrelated pairs: differences spread in many directions
    mean_diff = repe_reading_vectors(model, tok, pos, neg, layers=[1], progress=False).vectors[1]
    pca = repe_reading_vectors(model, tok, pos, neg, layers=[1], method="pca", progress=False).vectors[1]
    acts = collect_activations(model, tok, pos + neg, [(1, "block_output")], progress=False)[(1, "block_output")][:, 0]
    diffs = acts[:10] - acts[10:]
    top = torch.linalg.eigh(diffs.T @ diffs).eigenvectors[:, -1]
    assert abs(cos(pca, top)) > 1 - 1e-9 and cos(pca, mean_diff) > 0
    assert cos(pca, mean_diff) < 1 - 1e-6


def test_apply_repe_adds_alpha_vector_at_every_token(setup):
    model, tok, pos, neg = setup.model, setup.tok, setup.pos, setup.neg
    vectors = repe_reading_vectors(model, tok, pos, neg, layers=[0, 1], progress=False)
    sites = [(0, "block_output"), (1, "block_output")]
    base = collect_activations(model, tok, pos[:5], sites, "all", progress=False)
    reft_model = apply_repe(model, vectors, alpha=4.0, layers=[0])
    try:
        (iv,) = reft_model.interventions.values()
        assert isinstance(iv, reftlib.SteeringVectorIntervention) and not iv.trainable
        steered = collect_activations(reft_model, tok, pos[:5], sites, "all", progress=False)
    finally:
        reft_model.detach()
    expected = base[(0, "block_output")] + 4.0 * vectors.vectors[0] * base.mask.unsqueeze(-1)
    torch.testing.assert_close(steered[(0, "block_output")], expected, rtol=0, atol=1e-15 * 8)
    assert not torch.equal(steered[(1, "block_output")], base[(1, "block_output")])  # later layers see it

    config = repe_config(vectors, 1.0)
    assert [(r.layer, r.component, r.positions) for r in config.representations] == \
        [(0, "block_output", None), (1, "block_output", None)]
    search = tune_repe_alpha(model, vectors, lambda m: -abs(float(
        collect_activations(m, tok, pos[:3], [(0, "block_output")], progress=False)[(0, "block_output")].sum())),
        alphas=[0.0, 1.0], layers=[0])
    assert set(search.scores) == {0.0, 1.0}


def test_repe_argument_errors(setup):
    model, tok, pos, neg = setup.model, setup.tok, setup.pos, setup.neg
    with pytest.raises(ReftConfigError, match="must be one of"):
        repe_reading_vectors(model, tok, pos, neg, layers=[0], method="ica")
    with pytest.raises(InputError, match="as many of each"):
        repe_reading_vectors(model, tok, pos, neg[:-1], layers=[0], method="pca")
    with pytest.raises(ReftConfigError, match="iti_probe_heads"):
        repe_reading_vectors(model, tok, pos, neg, layers=[0], component="head_output")
    with pytest.raises(ReftConfigError, match="distinct layers"):
        repe_reading_vectors(model, tok, pos, neg, layers=[0, 0])
    vectors = repe_reading_vectors(model, tok, pos[:3], neg[:3], layers=0, progress=False)
    with pytest.raises(ReftConfigError, match="cover layers"):
        repe_config(vectors, 1.0, layers=[2])
    with pytest.raises(ReftConfigError, match="finite number"):
        repe_config(vectors, float("inf"))
