"""Exact math of every intervention against a hand-written formula, orthogonality, precision."""

import pytest
import torch

import reftlib
from reftlib.errors import ReftConfigError
from reftlib.interventions import OrthonormalRows

D, R = 16, 3


def _h(*shape):
    return torch.randn(*shape, D)


def _rand_params(iv):
    with torch.no_grad():
        for p in iv.parameters():
            p.copy_(torch.randn_like(p))
    return iv


def test_loreft_formula():
    iv = _rand_params(reftlib.LoreftIntervention(embed_dim=D, low_rank_dimension=R))
    h = _h(5, 7)
    rot = iv.rotate_layer.weight  # [r, d]
    W, b = iv.learned_source.weight, iv.learned_source.bias
    expected = h + ((h @ W.T + b) - h @ rot.T) @ rot
    torch.testing.assert_close(iv(h), expected)
    torch.testing.assert_close(rot @ rot.T, torch.eye(R), atol=1e-5, rtol=0)


def test_loreft_activation():
    iv = _rand_params(reftlib.LoreftIntervention(embed_dim=D, low_rank_dimension=R, act_fn="relu"))
    h = _h(4)
    rot = iv.rotate_layer.weight
    expected = h + (torch.relu(iv.learned_source(h)) - h @ rot.T) @ rot
    torch.testing.assert_close(iv(h), expected)


@pytest.mark.parametrize("add_bias", [False, True])
def test_noreft_formula(add_bias):
    iv = _rand_params(reftlib.NoreftIntervention(embed_dim=D, low_rank_dimension=R, add_bias=add_bias))
    h = _h(6)
    P = iv.proj_layer
    expected = h + (iv.learned_source(h) - P(h)) @ P.weight
    torch.testing.assert_close(iv(h), expected)


def test_direft_formula():
    iv = _rand_params(reftlib.DireftIntervention(embed_dim=D, low_rank_dimension=R))
    h = _h(6)
    rot = iv.rotate_layer.weight
    expected = h + (h @ iv.learned_source.weight.T + iv.learned_source.bias) @ rot
    torch.testing.assert_close(iv(h), expected)
    torch.testing.assert_close(rot @ rot.T, torch.eye(R), atol=1e-5, rtol=0)


def test_nodireft_formula():
    iv = _rand_params(reftlib.NodireftIntervention(embed_dim=D, low_rank_dimension=R, add_bias=True))
    h = _h(6)
    expected = h + (h @ iv.learned_source.weight.T + iv.learned_source.bias) @ iv.proj_layer.weight
    torch.testing.assert_close(iv(h), expected)


def test_consreft_formula():
    iv = _rand_params(reftlib.ConsreftIntervention(embed_dim=D, low_rank_dimension=R))
    h = _h(6)
    rot = iv.rotate_layer.weight
    expected = h + (iv.learned_source - h @ rot.T) @ rot
    torch.testing.assert_close(iv(h), expected)
    # the projection onto the subspace becomes the learned constant
    torch.testing.assert_close(iv(h) @ rot.T, iv.learned_source.expand(6, R), atol=1e-5, rtol=0)


def test_lobireft_formula():
    iv = _rand_params(reftlib.LobireftIntervention(embed_dim=D, low_rank_dimension=R))
    h = _h(2, 6)
    expected = h + iv.learned_source @ iv.rotate_layer.weight
    torch.testing.assert_close(iv(h), expected)


def test_head_scale_formula():
    iv = _rand_params(reftlib.HeadScaleIntervention(num_heads=4, head_dim=5))
    z = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(iv(z), (1 + iv.scale) * z)
    torch.testing.assert_close(iv.head_scores(), iv.scale.norm(dim=-1))


def test_head_bias_formula_only_selected_heads():
    iv = _rand_params(reftlib.HeadBiasIntervention(heads=[2, 0], num_heads=4, head_dim=5))
    z = torch.randn(2, 3, 4, 5)
    out = iv(z)
    torch.testing.assert_close(out[..., 2, :], z[..., 2, :] + iv.bias[0])
    torch.testing.assert_close(out[..., 0, :], z[..., 0, :] + iv.bias[1])
    assert torch.equal(out[..., 1, :], z[..., 1, :]) and torch.equal(out[..., 3, :], z[..., 3, :])


def test_head_init_is_near_identity():
    iv = reftlib.HeadScaleIntervention(num_heads=8, head_dim=4)
    assert iv.scale.abs().max() < 1e-2
    iv = reftlib.HeadBiasIntervention(num_heads=8, head_dim=4)
    assert iv.bias.shape == (8, 4)


def test_dropout_applies_to_the_edit_not_the_state():
    iv = _rand_params(reftlib.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dropout=0.5)).train()
    h = _h(2000)
    out = iv(h)
    unchanged = out == h
    # about half the coordinates keep h exactly (their edit dropped); none is zeroed, as dropout on the
    # whole output would do
    assert 0.4 < unchanged.float().mean() < 0.6
    assert not (out == 0).any()
    iv.eval()
    torch.testing.assert_close(iv(h), h + iv.edit(h))


def test_no_square_matrix_is_stored():
    d, r = 512, 4
    iv = reftlib.LoreftIntervention(embed_dim=d, low_rank_dimension=r)
    sizes = {k: v.numel() for k, v in iv.state_dict().items()}
    assert sum(sizes.values()) == 2 * d * r + r
    assert max(sizes.values()) == d * r


def test_orthonormal_after_training_steps():
    iv = reftlib.LoreftIntervention(embed_dim=D, low_rank_dimension=R)
    opt = torch.optim.Adam(iv.parameters(), lr=0.1)
    for _ in range(25):
        loss = (iv(_h(8)) - 3.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    rot = iv.rotate_layer.weight
    torch.testing.assert_close(rot @ rot.T, torch.eye(R), atol=1e-5, rtol=0)


def test_rotation_cache_invalidated_by_updates():
    rows = OrthonormalRows(D, R)
    with torch.no_grad():
        first = rows.weight.clone()
        assert rows.weight is rows.weight  # cached without grad
        rows.raw.add_(torch.randn_like(rows.raw))
        second = rows.weight
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second @ second.T, torch.eye(R), atol=1e-5, rtol=0)


def test_optimizer_steps_retract_raw_without_changing_r():
    """After each step that updated it, ``raw`` holds R's rows as columns of length 1/2 (R itself unchanged)."""
    from reftlib.interventions.rotation import INIT_COLUMN_NORM, rows_from_raw

    trained, frozen, elsewhere = OrthonormalRows(D, R), OrthonormalRows(D, R), OrthonormalRows(D, R)
    frozen_raw, elsewhere_raw = frozen.raw.detach().clone(), elsewhere.raw.detach().clone()
    opt = torch.optim.SGD([trained.raw, frozen.raw], lr=0.5)  # frozen: in the optimizer, no gradient
    target = torch.randn(R, D)
    for _ in range(3):
        opt.zero_grad()
        ((trained.weight - target) ** 2).sum().backward()
        with torch.no_grad():
            unretracted = (trained.raw - 0.5 * trained.raw.grad).clone()
        opt.step()
        with torch.no_grad():
            expected = trained.weight.clone()
            torch.testing.assert_close(expected, rows_from_raw(unretracted), atol=1e-5, rtol=0)
        norms = trained.raw.detach().norm(dim=0)
        torch.testing.assert_close(norms, torch.full((R,), INIT_COLUMN_NORM), atol=1e-6, rtol=0)
        gram = trained.raw.detach().T @ trained.raw.detach()
        torch.testing.assert_close(gram, torch.eye(R) * INIT_COLUMN_NORM**2, atol=1e-6, rtol=0)
    assert torch.equal(frozen.raw, frozen_raw) and torch.equal(elsewhere.raw, elsewhere_raw)


def test_set_weight_roundtrip():
    rows = OrthonormalRows(D, R)
    q = torch.linalg.qr(torch.randn(D, R))[0].T
    rows.set_weight(q)
    torch.testing.assert_close(rows.weight.abs(), q.abs(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_hidden_states(dtype):
    iv = reftlib.LoreftIntervention(embed_dim=D, low_rank_dimension=R)  # parameters in fp32
    h = _h(4, 3).to(dtype)
    out = iv(h)
    assert out.dtype == dtype and torch.isfinite(out).all()
    iv16 = reftlib.LoreftIntervention(embed_dim=D, low_rank_dimension=R, dtype=dtype)
    assert iv16.learned_source.weight.dtype == dtype
    out = iv16(h)  # QR runs in fp32 even for half-precision parameters
    assert out.dtype == dtype and torch.isfinite(out).all()
    rot = iv16.rotate_layer.weight
    assert rot.dtype == torch.float32


def test_deferred_dimensions_and_checks():
    iv = reftlib.LoreftIntervention(low_rank_dimension=2)
    assert not iv.is_built
    iv.build(8)
    assert iv.learned_source.weight.shape == (2, 8)
    with pytest.raises(ReftConfigError, match="embed_dim=8"):
        reftlib.LoreftIntervention(embed_dim=8, low_rank_dimension=2).build(16)
    with pytest.raises(ReftConfigError, match="low_rank_dimension"):
        reftlib.LoreftIntervention(low_rank_dimension=0)
    with pytest.raises(ReftConfigError, match="larger than"):
        reftlib.LoreftIntervention(low_rank_dimension=9).build(8)
    with pytest.raises(ReftConfigError, match="act_fn"):
        reftlib.LoreftIntervention(low_rank_dimension=2, act_fn="nope")
    with pytest.raises(ReftConfigError, match="num_heads"):
        reftlib.HeadScaleIntervention(num_heads=4).build(32, num_heads=8, head_dim=4)
    with pytest.raises(ReftConfigError, match="duplicates"):
        reftlib.HeadBiasIntervention(heads=[1, 1])
    with pytest.raises(ReftConfigError, match="do not exist"):
        reftlib.HeadBiasIntervention(heads=[9]).build(16, num_heads=4, head_dim=4)


def test_config_roundtrip_rebuilds_identical_module():
    from reftlib.config import intervention_from_config

    for iv in [
        reftlib.LoreftIntervention(embed_dim=D, low_rank_dimension=R, act_fn="gelu", dropout=0.1),
        reftlib.NoreftIntervention(embed_dim=D, low_rank_dimension=R, add_bias=True),
        reftlib.DireftIntervention(embed_dim=D, low_rank_dimension=R, dtype="bfloat16"),
        reftlib.NodireftIntervention(embed_dim=D, low_rank_dimension=R, add_bias=True),
        reftlib.HeadBiasIntervention(heads=[1, 3], num_heads=4, head_dim=4),
    ]:
        clone = intervention_from_config(iv.get_config())
        assert type(clone) is type(iv) and clone.get_config() == iv.get_config()
        assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in iv.state_dict().items()}
        assert all(a.dtype == b.dtype for a, b in zip(clone.parameters(), iv.parameters()))


def test_custom_intervention_by_forward_and_by_edit():
    @reftlib.register_intervention("test_add_vector")
    class AddVector(reftlib.Intervention):
        def build_parameters(self):
            self.vector = torch.nn.Parameter(torch.ones(self.embed_dim))

        def edit(self, h):
            return self.vector.expand_as(h)

    @reftlib.register_intervention("test_double")
    class Double(reftlib.Intervention):
        def build_parameters(self):
            pass

        def forward(self, h):
            return 2 * h

    h = _h(3)
    a = AddVector(embed_dim=D)
    torch.testing.assert_close(a(h), h + 1)
    torch.testing.assert_close(a.delta(h), torch.ones_like(h))
    d = Double(embed_dim=D)
    torch.testing.assert_close(d.delta(h), h)
    assert reftlib.registered_interventions()["test_add_vector"] is AddVector
    with pytest.raises(ReftConfigError, match="already registered"):
        reftlib.register_intervention("test_add_vector")(Double)


def test_rotation_basis_is_the_signed_hartley_transform():
    """Saved rotations are coordinates in this basis: it must never change (checked against the formula)."""
    import math

    from reftlib.interventions.rotation import _signs, raw_from_columns, rows_from_raw

    d = 12
    signs = _signs(d, torch.device("cpu")).flatten()
    assert signs.int().tolist() == [1, -1, -1, -1, -1, 1, -1, -1, 1, -1, -1, 1]
    j = torch.arange(d, dtype=torch.float64)
    angle = 2 * math.pi * j[:, None] * j[None, :] / d
    cas = ((torch.cos(angle) + torch.sin(angle)) / math.sqrt(d)).float()  # H[j, k]
    expected = (cas[:, :3] * signs[:3]).T  # row k of R = s_k * H[:, k]
    torch.testing.assert_close(rows_from_raw(torch.eye(d)[:, :3] * 0.5), expected, atol=1e-6, rtol=0)
    columns = torch.linalg.qr(torch.randn(d, 3))[0]
    torch.testing.assert_close(rows_from_raw(raw_from_columns(columns)), columns.T, atol=1e-6, rtol=0)
