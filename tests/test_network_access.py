"""Offline, whatever needs the network fails at once in one line that names what was fetched and the offline
alternative, instead of retrying for about 45 s. The network is simulated: nothing here connects outside the
machine (the hub's reachability probe is replaced; huggingface_hub's offline mode sends no request)."""

from __future__ import annotations

import socket
import sys
import types
import urllib.error
from pathlib import Path

import pytest
from conftest import SHRINK, compose_config
from test_experiments import try_out_overrides

from lightning_slsam.app.cli import ConfigError, error_line, train
from lightning_slsam.loading import network_access
from lightning_slsam.loading.network_access import NetworkUnavailableError, host_reachable, hugging_face_hub

ABSENT_MODEL = "lightning-slsam-tests/no-such-model"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub's host cannot be reached (and HF_HUB_OFFLINE is not set)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(network_access, "host_reachable", lambda url, timeout_s=3.0: False)


def _one_line(error: BaseException) -> str:
    line = error_line(error)
    assert line is not None and "\n" not in line, line
    return line


def test_host_reachable_opens_one_connection_and_trusts_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in network_access.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    host_reachable.cache_clear()
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        port = listening.getsockname()[1]
        assert host_reachable(f"http://127.0.0.1:{port}")
    with socket.socket() as closed:  # bound, not listening: the connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        assert not host_reachable(f"http://127.0.0.1:{port}", timeout_s=1.0)
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
        host_reachable.cache_clear()
        assert host_reachable(f"http://127.0.0.1:{port}", timeout_s=1.0)  # the proxy reaches it, not we
    host_reachable.cache_clear()


def test_offline_the_block_runs_in_hub_offline_mode_and_fails_in_one_line(offline: None) -> None:
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    with pytest.raises(NetworkUnavailableError) as error, hugging_face_hub("pretrained", "some weights", "use X"):
        assert constants.HF_HUB_OFFLINE is True
        raise OSError("We couldn't connect to the hub\nto load this file")
    assert before == constants.HF_HUB_OFFLINE
    message = str(error.value)
    assert "\n" not in message and message.startswith("pretrained: cannot fetch some weights: ")
    assert "cannot be reached" in message and message.endswith("; use X")
    assert isinstance(error.value, ConnectionError) and isinstance(error.value.__cause__, OSError)


def test_online_the_block_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(network_access, "host_reachable", lambda url, timeout_s=3.0: True)
    with pytest.raises(OSError, match=r"^boom$"), hugging_face_hub("pretrained", "w", "use X"):
        raise OSError("boom")


def test_hf_hub_offline_set_by_the_user_also_gives_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(network_access, "host_reachable", lambda url, timeout_s=3.0: pytest.fail("probed"))
    with pytest.raises(NetworkUnavailableError, match="HF_HUB_OFFLINE is set"), hugging_face_hub("a", "w", "x"):
        raise OSError("not cached")


def test_text_model_from_the_hub_offline_names_it_and_the_local_alternatives(offline: None) -> None:
    from lightning_slsam.models import TextClassifier

    with pytest.raises(NetworkUnavailableError) as error:
        TextClassifier(model_name_or_path=ABSENT_MODEL)
    message = _one_line(error.value)
    assert message.startswith(f"ConnectionError: model_name_or_path: cannot fetch '{ABSENT_MODEL}'")
    assert "model.model_name_or_path" in message and "minilm_path" in message


def test_tokenizer_from_the_hub_offline_is_one_line(offline: None, tmp_path: Path) -> None:
    from lightning_slsam.data import TextTSVDataModule

    (tmp_path / "train.tsv").write_text("text\tlabel\na\t0\nb\t1\n")
    (tmp_path / "dev.tsv").write_text("text\tlabel\na\t0\nb\t1\n")
    data = TextTSVDataModule(path=str(tmp_path), tokenizer=ABSENT_MODEL)
    with pytest.raises(NetworkUnavailableError) as error:
        data.setup("fit")
    assert _one_line(error.value).startswith(f"ConnectionError: tokenizer: cannot fetch '{ABSENT_MODEL}'")


def _hub_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in timm whose create_model(pretrained=True) downloads its file with huggingface_hub, as timm does."""

    def create_model(name: str, pretrained: bool = False, **kwargs: object) -> None:
        from huggingface_hub import hf_hub_download

        hf_hub_download(f"timm/{name}", "model.safetensors")  # offline mode: LocalEntryNotFoundError, no request
        raise AssertionError("downloaded although offline")

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))


def test_slsam_train_vit_pretrained_offline_is_one_line_naming_the_alternatives(
    offline: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hub_timm(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache
    overrides = [o for o in try_out_overrides("vit_cifar10", tmp_path) if o != "model.pretrained=false"]
    cfg = compose_config([*overrides, "model.pretrained=true", "model.patch_size=16", *SHRINK], str(tmp_path / "r"))
    with pytest.raises(ConfigError) as error:
        train(cfg)
    line = _one_line(error.value)
    assert line.startswith("ConfigError: model.pretrained: cannot fetch timm's vit_small_patch16_224 weights")
    assert "model.pretrained=false" in line and "model.weights=" in line


def test_slsam_train_text_experiment_with_a_hub_model_offline_is_one_line(offline: None, tmp_path: Path) -> None:
    overrides = [
        o if not o.startswith("model.model_name_or_path=") else f"model.model_name_or_path={ABSENT_MODEL}"
        for o in try_out_overrides("roberta_mnli", tmp_path)
    ]
    cfg = compose_config([*overrides, *SHRINK], str(tmp_path / "r"))
    with pytest.raises(NetworkUnavailableError) as error:  # the data's tokenizer is the first to need the hub
        train(cfg)
    line = _one_line(error.value)
    assert line.startswith(f"ConnectionError: tokenizer: cannot fetch '{ABSENT_MODEL}'")
    assert "model.model_name_or_path" in line


def test_torchvision_weights_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    from lightning_slsam.models import torchvision_resnet

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    with pytest.raises(NetworkUnavailableError) as error:
        torchvision_resnet("resnet18", num_classes=10, pretrained=True)
    line = _one_line(error.value)
    assert line.startswith("ConnectionError: pretrained: cannot fetch torchvision's resnet18 ImageNet weights")
    assert "Temporary failure in name resolution" in line and "model.pretrained=false" in line
