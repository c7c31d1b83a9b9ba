"""Serving saved adapters on vLLM computes what reftlib's Hugging Face model computes.

Runs only where vLLM is installed (``make test-vllm`` builds ``.venv-vllm`` with the CPU build).
Every test runs on two engines, one after the other: an eager one (``enforce_eager=True``, hooks
added after start-up) and a compiled one (vLLM's default on its CPU platform: ``torch.compile``
with inductor, reftlib's model class hooking the sites as it is built). Start-up takes about a
minute each (the compiled one compiles for about another minute). Each served answer is checked
against reftlib's Hugging Face model with the same adapters in float64, fed the served tokens
(``served_reference.check_served``: greedy up to a near tie, log-probabilities within a tolerance
that every adapter's effect exceeds tenfold).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from served_reference import (
    ADAPTERS,
    LONG_REQUEST,
    MAX_NEW,
    QUESTIONS,
    SEPARATION,
    TOLERANCE,
    chat_prompt,
    check_served,
    load_reference,
    reference_logprobs,
    save_test_adapters,
)

vllm = pytest.importorskip("vllm")

import reftlib  # noqa: E402
from reftlib.serving import ReftLLM, cache_salt  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(folder of the test adapters, pyreft copy of "default", float64 HF ReftModel with them)``."""
    folder = tmp_path_factory.mktemp("adapters")
    pyreft_folder = tmp_path_factory.mktemp("pyreft")
    save_test_adapters(folder, pyreft_copy=pyreft_folder)
    return folder, pyreft_folder, load_reference(folder)


@pytest.fixture(scope="module", params=["eager", "compiled"])
def setup(request, saved):
    """``(engine, tokenizer, prompts as token ids, float64 HF ReftModel with the same adapters)``."""
    from transformers import AutoTokenizer

    from reftlib.offline import default_model_path

    folder, pyreft_folder, reference = saved
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    prompts = [chat_prompt(tokenizer, q) for q in QUESTIONS]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = ReftLLM(default_model_path(), adapters={**dict.fromkeys(ADAPTERS, folder), "pyreft": pyreft_folder},
                     pyreft_positions={"pyreft": "l1"}, dtype="float32", max_model_len=256, max_num_seqs=4,
                     max_num_batched_tokens=48, block_size=32, seed=0, enforce_eager=request.param == "eager")
    yield engine, tokenizer, prompts, reference
    engine.shutdown()
    # vLLM shuts its engine process down from an atexit hook that logs to streams pytest has closed
    # by then; those messages would print "--- Logging error ---" tracebacks after the summary.
    logging.raiseExceptions = False


def _check_served(setup, rows: list[tuple[list[int], str | None]],
                  reference_names: dict[str, str] | None = None) -> list[list[int]]:
    """Serve ``rows`` (prompt, adapter) as one batch, check every row against the reference (whose adapter
    ``reference_names.get(name, name)``), return the tokens."""
    engine, _, _, reference = setup
    params = vllm.SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=1)
    outs = engine.generate([p for p, _ in rows], params, adapters=[a for _, a in rows])
    served = []
    for row, ((prompt, adapter), out) in enumerate(zip(rows, outs)):
        tokens = list(out.outputs[0].token_ids)
        logprobs = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)]
        if isinstance(adapter, str) and reference_names:
            adapter = reference_names.get(adapter, adapter)
        check_served(reference, prompt, adapter, tokens, logprobs, f"row {row}")
        served.append(tokens)
    return served


def test_base_model_matches_hf(setup):
    prompts = setup[2]
    _check_served(setup, [(p, None) for p in prompts])


@pytest.mark.parametrize("adapter", ["default", "fl", "lofit"])
def test_adapter_matches_hf(setup, adapter):
    """LoReFT at "l1", LoReFT at "f2+l2" on two layers, LoFiT head offsets (every position)."""
    prompts = setup[2]
    _check_served(setup, [(p, adapter) for p in prompts])


def test_raw_pyreft_checkpoint_is_served(setup):
    """A folder saved by pyreft, served with the positions it was trained at (``pyreft_positions``),
    computes what the reftlib adapter it was written from computes, next to that adapter and base rows."""
    prompts = setup[2]
    adapters = setup[0].adapters
    assert [spec for _, spec in adapters["pyreft"].positions] == [spec for _, spec in adapters["default"].positions]
    _check_served(setup, [(prompts[0], "pyreft"), (prompts[1], "pyreft"), (prompts[2], None), (prompts[3], "pyreft"),
                          (prompts[0], "default")], reference_names={"pyreft": "default"})


def test_stacked_adapters_match_hf(setup):
    """A request may stack adapters, applied in its order as ``ReftModel.generate``'s list entries
    (``default`` and ``l15`` edit the same site, so their two orders give different answers);
    stacks share batches with single adapters and base rows."""
    prompts, reference = setup[2], setup[3]
    tokens = _check_served(setup, [(prompts[0], ["default", "l15"]), (prompts[0], ["l15", "default"]),
                                   (prompts[1], ["lofit", "fl"]), (prompts[2], ["fl", "default", "lofit"]),
                                   (prompts[3], "lofit"), (prompts[1], None)])[0]
    one_order = reference_logprobs(reference, prompts[0], ["default", "l15"], tokens)
    other_order = reference_logprobs(reference, prompts[0], ["l15", "default"], tokens)
    steps, chosen = range(len(tokens)), tokens
    moved = (one_order[steps, chosen] - other_order[steps, chosen]).abs().max().item()
    assert moved >= SEPARATION * TOLERANCE, f"the two orders differ by {moved:.3g} nats only; the order is not tested"


def test_mixed_batch_matches_hf(setup):
    """Adapters and base rows share one continuous batch; each row gets its own adapter's tokens."""
    prompts = setup[2]
    _check_served(setup, [(prompts[0], "default"), (prompts[1], None), (prompts[2], "lofit"), (prompts[3], "fl"),
                          (prompts[0], None), (prompts[1], "lofit"), (prompts[2], "default"), (prompts[3], None)])


def test_chunked_prefill_and_prefix_cache(setup):
    """A prompt longer than the per-step token budget is prefilled in chunks, and its full KV blocks go
    to the prefix cache: each adapter still gets its own tokens ("l1" on the last prompt token, LoFiT on
    every token), run one after the other on the same prompt, the base model first. Without
    per-adapter cache salts the adapters would reuse the base model's cached blocks."""
    engine, tokenizer, _, _ = setup
    config = engine.llm.llm_engine.vllm_config
    budget = config.scheduler_config.max_num_batched_tokens
    long_prompt = chat_prompt(tokenizer, LONG_REQUEST)
    assert len(long_prompt) + MAX_NEW <= config.model_config.max_model_len
    assert len(long_prompt) > budget, "the prompt must not fit in one step"
    assert config.cache_config.enable_prefix_caching
    assert config.cache_config.block_size <= len(long_prompt) // 2, "the prompt must fill a cached block"
    for adapter in (None, "lofit", "fl", "default", None):
        _check_served(setup, [(long_prompt, adapter)])


def test_cache_salt_separates_adapters_and_prompt_lengths(setup):
    engine = setup[0]
    assert cache_salt(None, 10) is None
    assert cache_salt(engine.adapters["default"], 10) != cache_salt(engine.adapters["default"], 11)
    assert cache_salt(engine.adapters["lofit"], 10) == cache_salt(engine.adapters["lofit"], 11)
    assert cache_salt(engine.adapters["lofit"], 10) != cache_salt(engine.adapters["fl"], 10)
    lofit, default = engine.adapters["lofit"], engine.adapters["default"]
    assert cache_salt([lofit, default], 10) not in (cache_salt([default, lofit], 10), cache_salt(lofit, 10))
    assert cache_salt([lofit, default], 10) != cache_salt([lofit, default], 11)  # "default" is at "l1"
    assert cache_salt([lofit], 10) == cache_salt(lofit, 10) and cache_salt([], 10) is None


def test_unknown_adapter_is_refused(setup):
    engine = setup[0]
    with pytest.raises(reftlib.AdapterError, match="unknown adapter"):
        engine.generate(["hi"], adapters=["nope"])
    with pytest.raises(reftlib.AdapterError, match="unknown adapter"):
        engine.generate(["hi"], adapters=[["lofit", "nope"]])
    with pytest.raises(reftlib.AdapterError, match="twice"):
        engine.generate(["hi"], adapter=["lofit", "lofit"])


def test_unservable_adapter_is_refused_before_the_engine_starts(tmp_path):
    from reftlib.offline import default_model_path, load_default_model

    model, _ = load_default_model(dtype=torch.float32)
    reftlib.get_reft_model(model, {"layer": 2, "component": "mlp_output", "low_rank_dimension": 2},
                           set_device=False).save_pretrained(tmp_path)
    with pytest.raises(reftlib.AdapterError, match="mlp_output"):
        ReftLLM(default_model_path(), adapters={"default": tmp_path}, dtype="float32")


def test_unsupported_vllm_version_is_refused():
    from reftlib.serving.vllm_backend import check_vllm_version

    assert check_vllm_version("0.32.3") == "0.32.3"
    with pytest.raises(reftlib.ReftError, match=r"vLLM 0\.31\.0 is not supported.*0\.32\.x"):
        check_vllm_version("0.31.0")


def test_settings_that_break_the_hooks_are_refused():
    from reftlib.offline import default_model_path

    with pytest.raises(reftlib.ReftError, match="worker_extension_cls"):
        ReftLLM(default_model_path(), worker_extension_cls="my.Extension")
    with pytest.raises(reftlib.ReftError, match="tensor_parallel_size=1"):
        ReftLLM(default_model_path(), tensor_parallel_size=2)


def test_engine_runs_compiled_or_eager_as_asked(setup):
    """The compiled engine really is compiled, with reftlib's model class hooking every adapter's site
    before compilation; the eager one runs vLLM's own class, hooked after start-up."""
    from reftlib.serving.vllm_backend import adapter_sites

    engine = setup[0]
    eager = engine.llm.llm_engine.vllm_config.model_config.enforce_eager
    mode = engine.llm.collective_rpc("reft_engine_mode")[0]
    assert mode["compiled"] is not eager
    assert mode["model_class"] == ("LlamaForCausalLM" if eager else "ReftlibLlamaForCausalLM")
    assert mode["sites"] == sorted([layer, component] for layer, component in adapter_sites(engine.adapters.values()))
    compilation = engine.llm.llm_engine.vllm_config.compilation_config
    assert (compilation.mode == 0) is eager, "a compiled engine must not fall back to eager silently"


def test_engine_settings_compile_on_cpu_only(caplog):
    """Compiled on vLLM's CPU platform (hf_overrides selects reftlib's class, additional_config lists the
    sites); eager, with a logged reason, where CUDA graphs would replay one step's edits, for an
    architecture without a reftlib class, or when hf_overrides is the user's function."""
    from reftlib.serving.vllm_backend import WORKER_EXTENSION, engine_settings

    class Adapter:
        interventions = [type("Served", (), {"layer": 15, "component": "block_output"}),
                         type("Served", (), {"layer": 3, "component": "head_output"})]

    config = {"architectures": ["LlamaForCausalLM"]}
    settings = engine_settings(config, [Adapter()], {"hf_overrides": {"rope_theta": 1.0}}, platform="cpu")
    assert settings == {"worker_extension_cls": WORKER_EXTENSION, "enforce_eager": False,
                        "hf_overrides": {"rope_theta": 1.0, "architectures": ["ReftlibLlamaForCausalLM"]},
                        "additional_config": {"reftlib": {"sites": [[3, "head_output"], [15, "block_output"]]}}}
    assert engine_settings(config, [Adapter()], {"enforce_eager": True}, platform="cpu") == {
        "worker_extension_cls": WORKER_EXTENSION, "enforce_eager": True}
    for config, kwargs, platform, reason in [
        ({"architectures": ["LlamaForCausalLM"]}, {}, "cuda", "CUDA graphs"),
        ({"architectures": ["Gemma2ForCausalLM"]}, {}, "cpu", "Gemma2ForCausalLM"),
        ({"architectures": ["LlamaForCausalLM"]}, {"hf_overrides": lambda c: c}, "cpu", "hf_overrides"),
    ]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="reftlib.serving.vllm_backend"):
            assert engine_settings(config, [Adapter()], kwargs, platform=platform)["enforce_eager"] is True
        assert reason in caplog.text and "enforce_eager=True" in caplog.text


def test_other_architectures_are_refused(setup, tmp_path):
    from reftlib.serving.adapters import load_served_adapter

    folder = setup[0].adapters["default"].folder
    with pytest.raises(reftlib.AdapterError, match="'gpt2'"):
        load_served_adapter("default", folder, {"model_type": "gpt2", "num_hidden_layers": 30, "hidden_size": 576,
                                                "num_attention_heads": 9})


def test_an_adapter_on_a_new_site_after_start_up(setup, tmp_path):
    """Loading an adapter into a running engine (``reft_load_adapters`` over ``collective_rpc``): an eager
    engine hooks the new site; a compiled one refuses it, naming the fix (hooks added after compilation
    would never run), and goes on serving. Last in the module: it changes the engine."""
    from reftlib.offline import load_default_model

    engine = setup[0]
    model, _ = load_default_model(dtype=torch.float32)
    reftlib.get_reft_model(model, {"layer": 7, "component": "block_output", "low_rank_dimension": 2, "positions": "l1"},
                           set_device=False).save_pretrained(tmp_path)
    sources = {"late": (str(tmp_path), None)}
    if engine.llm.llm_engine.vllm_config.model_config.enforce_eager:
        assert "late" in engine.llm.collective_rpc("reft_load_adapters", args=(sources, engine.model_config))[0]
        assert [7, "block_output"] in engine.llm.collective_rpc("reft_engine_mode")[0]["sites"]
    else:
        with pytest.raises(Exception, match=r"compiled without the sites \[\(7, 'block_output'\)\]"):
            engine.llm.collective_rpc("reft_load_adapters", args=(sources, engine.model_config))
        assert [7, "block_output"] not in engine.llm.collective_rpc("reft_engine_mode")[0]["sites"]
    _check_served(setup, [(setup[2][0], "default"), (setup[2][1], None)])
