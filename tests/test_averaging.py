import pytest
import torch
from safetensors.torch import load_file, save_file

from posttrain.averaging import average_checkpoints, average_state_dicts


def _ckpt(path, tensors):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text("{}")
    return path


def test_mean_of_two_checkpoints_is_elementwise_exact(tmp_path):
    a = {"w": torch.tensor([1.0, 2.0, -3.0]), "b": torch.tensor([[0.5, 4.0]])}
    b = {"w": torch.tensor([3.0, 0.0, 5.0]), "b": torch.tensor([[1.5, -4.0]])}
    out = average_checkpoints([_ckpt(tmp_path / "a", a), _ckpt(tmp_path / "b", b)], tmp_path / "soup")
    avg = load_file(str(out / "model.safetensors"))
    assert avg["w"].tolist() == [2.0, 1.0, 1.0]
    assert avg["b"].tolist() == [[1.0, 0.0]]
    assert (out / "config.json").is_file()


def test_weighted_mean_uses_normalised_weights():
    a, b = {"w": torch.tensor([0.0, 4.0])}, {"w": torch.tensor([4.0, 0.0])}
    assert average_state_dicts([a, b], [3.0, 1.0])["w"].tolist() == [1.0, 3.0]


def test_averaging_a_model_with_itself_changes_nothing(tiny_model_dir, tmp_path):
    out = average_checkpoints([tiny_model_dir, tiny_model_dir, tiny_model_dir], tmp_path / "self")
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    averaged = load_file(str(out / "model.safetensors"))
    assert original.keys() == averaged.keys()
    for key in original:
        assert torch.equal(original[key], averaged[key]), key


def test_bf16_average_is_cast_back_and_exact():
    a = {"w": torch.tensor([1.0, 3.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([2.0, 5.0], dtype=torch.bfloat16)}
    avg = average_state_dicts([a, b])["w"]
    assert avg.dtype == torch.bfloat16 and avg.tolist() == [1.5, 4.0]


@pytest.mark.parametrize(
    "sds, weights, message",
    [
        ([], None, "no state dicts"),
        ([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], None, "different tensors"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], None, "shapes differ"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(2)}], [1.0], "weights"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(2)}], [-1.0, 2.0], "weights"),
    ],
)
def test_bad_inputs_fail_clearly(sds, weights, message):
    with pytest.raises(ValueError, match=message):
        average_state_dicts(sds, weights)


def test_mixing_adapters_and_full_checkpoints_is_refused(tmp_path):
    full = _ckpt(tmp_path / "full", {"w": torch.zeros(2)})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"w": torch.zeros(2)}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="cannot mix"):
        average_checkpoints([full, adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()
