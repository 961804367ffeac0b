"""The one table of loss scalars (``ekipl_kernels.loss_scalars``) and the ops that read it.

* The table encodes every ``LossConfig`` field the per-token loss reads, in a pinned order.
* The C++ op reads each slot under the table's name (through the header generated from the table), and
  refuses a vector of the wrong length naming the expected count and order.
* The Triton kernels read every scalar of the table, and refuse (at import) a table they do not handle.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from ekipl_kernels import LossConfig
from ekipl_kernels.loss_scalars import LOSS_SCALARS, SCALAR_TABLE, cpp_header, loss_scalars, slot

# Read before the ops: the aggregation weights come from agg and max_len, sequence-level TIS weights (tis_level)
# from rewritten behaviour log-probs (inputs.prepare_token_inputs), and sequence-level ratios (ratio_level) run
# the chunked backend.
POLICY_LEVEL_FIELDS = ("agg", "max_len", "ratio_level", "tis_level")

# The ABI of the ekipl:: loss ops: changing this order changes every caller of the raw ops.
EXPECTED_ORDER = (
    "eps_low", "eps_high", "dual_clip", "beta", "kl_kind", "temperature", "entropy_coef", "expert_mode",
    "shaping_gamma", "is_cap", "tis_cap", "log_ratio_clamp", "kl_clamp", "policy_loss", "cispo_cap",
    "sapo_temperature_pos", "sapo_temperature_neg", "kl_bias_correction",
)


def test_the_table_encodes_every_loss_config_field_but_the_policy_level_ones():
    config_fields = {field.name for field in dataclasses.fields(LossConfig)}
    encoded = [entry.field for entry in SCALAR_TABLE]
    assert len(encoded) == len(set(encoded)), "a LossConfig field is encoded twice"
    assert set(encoded) == config_fields - set(POLICY_LEVEL_FIELDS)
    assert LOSS_SCALARS == EXPECTED_ORDER
    assert [slot(name) for name in LOSS_SCALARS] == list(range(len(LOSS_SCALARS)))
    with pytest.raises(KeyError, match="'kl' is not a loss scalar; the table holds eps_low, eps_high"):
        slot("kl")


def test_encodings_of_switches_and_of_knobs_that_are_off():
    default = dict(zip(LOSS_SCALARS, loss_scalars(LossConfig())))
    assert default["kl_kind"] == 3.0 and default["expert_mode"] == 0.0 and default["policy_loss"] == 0.0
    assert default["dual_clip"] == default["is_cap"] == default["tis_cap"] == 0.0  # None: off
    assert default["kl_bias_correction"] == 0.0 and default["log_ratio_clamp"] == 20.0
    config = LossConfig(kl="k1", expert_mode="is", is_cap=2.0, tis_cap=3.0, policy_loss="sapo", kl_clamp=None,
                        kl_bias_correction=True, temperature=0.7)
    values = dict(zip(LOSS_SCALARS, loss_scalars(config)))
    assert values["kl_kind"] == 1.0 and values["expert_mode"] == 1.0 and values["policy_loss"] == 2.0
    assert values["is_cap"] == 2.0 and values["tis_cap"] == 3.0 and values["kl_clamp"] == 0.0
    assert values["kl_bias_correction"] == 1.0 and values["temperature"] == 0.7
    assert all(isinstance(value, float) for value in values.values())


def test_cpp_header_renders_one_constant_per_slot_and_the_count():
    header = cpp_header()
    assert f"constexpr int64_t kLossScalarCount = {len(LOSS_SCALARS)};" in header
    for index, name in enumerate(LOSS_SCALARS):
        constant = "k" + "".join(part.capitalize() for part in name.split("_"))
        assert f"constexpr int64_t {constant} = {index};" in header
    names = header.split("kLossScalarNames[kLossScalarCount] = {")[1].split("}")[0]
    assert names == ", ".join(f'"{name}"' for name in LOSS_SCALARS)


# ----------------------------------------------------------------------------- the C++ op


@pytest.fixture(scope="module")
def cpu_op():
    from ekipl_kernels.op_builder import CPU_OP_NAME, LOSS_SCALARS_HEADER, _cpu_capability, load_cpu_op

    load_cpu_op()
    from torch.utils import cpp_extension

    name = f"{CPU_OP_NAME}_{_cpu_capability().lower()}"
    return Path(cpp_extension._get_build_directory(name, verbose=False)) / "generated" / LOSS_SCALARS_HEADER


def _loss_call(scalars):
    """``ekipl::grpo_loss`` on a tiny batch with ``scalars``."""
    n, vocab = 4, 10
    logits = torch.randn(n, vocab)
    vectors = (torch.randn(n), torch.ones(n), torch.zeros(n, dtype=torch.bool), None, torch.randn(n) - 2, None)
    return torch.ops.ekipl.grpo_loss(logits, torch.arange(n), *vectors, scalars=scalars, need_entropy=False,
                                     grad_logits=True)


def test_the_op_was_compiled_with_the_header_of_this_table(cpu_op):
    assert cpu_op.read_text() == cpp_header()


def test_the_op_reads_each_slot_under_the_tables_name(cpu_op):
    """A NaN in slot i is reported under the i-th name of the table: the compiled slots follow the table."""
    good = loss_scalars(LossConfig(beta=0.1))
    _loss_call(good)
    for index, name in enumerate(LOSS_SCALARS):
        bad = list(good)
        bad[index] = math.nan
        with pytest.raises(RuntimeError, match=rf"the loss scalars must be finite; got nan for {name} \(scalars\[{index}\]\)"):
            _loss_call(bad)


def test_the_op_refuses_switches_outside_their_codes(cpu_op):
    for name, value in (("kl_kind", 4.0), ("expert_mode", 1.5), ("policy_loss", -1.0), ("kl_bias_correction", 2.0)):
        bad = loss_scalars(LossConfig(beta=0.1))
        bad[slot(name)] = value
        with pytest.raises(RuntimeError, match=rf"grpo_loss: {name} \(scalars\[{slot(name)}\]\) must be"):
            _loss_call(bad)


def test_the_op_refuses_a_vector_of_the_wrong_length(cpu_op):
    scalars = loss_scalars(LossConfig(beta=0.1))
    order = ", ".join(LOSS_SCALARS)
    for wrong in (scalars[:-1], scalars + [0.0], []):
        with pytest.raises(RuntimeError, match=rf"ekipl::grpo_loss: scalars must hold the {len(LOSS_SCALARS)} loss "
                                               rf"scalars in the order {order} .*got {len(wrong)} values"):
            _loss_call(wrong)


# ----------------------------------------------------------------------------- the Triton kernels


@pytest.fixture(scope="module")
def token_loss_module():
    triton_backend = pytest.importorskip("ekipl_kernels.triton_backend")
    pytest.importorskip("triton")
    return triton_backend.kernel_package(interpreted=True).token_loss


def test_triton_kernels_refuse_a_table_they_do_not_read(token_loss_module, monkeypatch):
    token_loss_module._check_every_scalar_is_read()  # as at import
    monkeypatch.setattr(token_loss_module, "LOSS_SCALARS", LOSS_SCALARS + ("new_knob",))
    with pytest.raises(ImportError, match=r"\['new_knob'\] are in the table but load_token_loss reads no slot"):
        token_loss_module._check_every_scalar_is_read()


def test_triton_slot_constants_follow_the_table(token_loss_module):
    for name in LOSS_SCALARS:
        if name not in token_loss_module.HOST_SCALARS:
            assert getattr(token_loss_module, name.upper()).value == slot(name), name


def test_triton_token_args_check_the_scalars(token_loss_module):
    n = 3
    vectors = (torch.randn(n), torch.ones(n), torch.zeros(n, dtype=torch.bool), None, None, None)
    good = loss_scalars(LossConfig())
    token_loss_module.token_args(*vectors, good)
    with pytest.raises(ValueError, match=f"scalars must hold the {len(LOSS_SCALARS)} loss scalars in the order eps_low"):
        token_loss_module.token_args(*vectors, good[:-1])
    bad = list(good)
    bad[slot("kl_clamp")] = math.inf
    with pytest.raises(ValueError, match="the loss scalars must be finite; got kl_clamp=inf"):
        token_loss_module.token_args(*vectors, bad)
    bad = list(good)
    bad[slot("policy_loss")] = 3.0
    with pytest.raises(ValueError, match=r"policy_loss must be one of \[0, 1, 2\]"):
        token_loss_module.token_args(*vectors, bad)
    with pytest.raises(ValueError, match="ref_logprobs is required when beta > 0"):
        token_loss_module.token_args(*vectors, loss_scalars(LossConfig(beta=0.1)))


def test_triton_scalars_reach_a_device_once_per_config(token_loss_module):
    scalars = tuple(loss_scalars(LossConfig(beta=0.1)))
    first = token_loss_module.scalars_on(scalars, torch.device("cpu"))
    assert token_loss_module.scalars_on(scalars, torch.device("cpu")) is first
    assert first.dtype == torch.float32 and first.tolist() == pytest.approx(scalars)
