"""Weight formats in the deploy wing: the packed file of every format (its tensor bytes the
accounted size, reloaded bit for bit), files of 0.1.x loading unchanged, ONNX with MatMulNBits
blocks and blocked DequantizeLinear, and torchao's per-group and asymmetric configs."""

from __future__ import annotations

from pathlib import Path

import pytest


torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
safetensors_torch = pytest.importorskip("safetensors.torch")

from optuna_ctpe.deploy import load_packed  # noqa: E402
from optuna_ctpe.deploy import read_packed_metadata  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).parent.parent / "fixtures"


def _fixture_model() -> torch.nn.Module:
    """The architecture of ``tests/fixtures/make_packed_v1.py``."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 6)
    )


def test_a_packed_file_of_0_1_loads_bit_for_bit() -> None:
    expected = safetensors_torch.load_file(str(FIXTURES / "packed_v1_expected.safetensors"))
    document = read_packed_metadata(FIXTURES / "packed_v1.safetensors")
    assert document["version"] == 1 and document["config"]["bits"] == {"0": 3, "3": 5}
    net = load_packed(FIXTURES / "packed_v1.safetensors", _fixture_model())
    state = net.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype
        assert torch.equal(state[name].view(torch.int32), tensor.view(torch.int32)), name
    # The weights really are on 3- and 5-bit grids (the fixture is not a float model).
    assert len(torch.unique(state["0.weight"][0])) <= 7
    assert len(torch.unique(state["3.weight"][0])) <= 31
