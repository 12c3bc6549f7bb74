"""Backbones on real data: packaged weights, weight files, preprocessing, classifier access, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dq_ops.backbone_spec import RANDOM_WEIGHTS, weights_digest
from dq_ops.backbones import backbone_dim, load_classifier, load_image_extractor, read_state_dict
from dq_ops.errors import DQInputError
from dq_ops.gradcam import gradcam_plus_plus
from dq_ops.readers.idx import load_fashion_mnist


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Measured on the shared 2-core machine: one intra-op thread is several times faster than two
    # when other processes compete for the cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def fashion_sample() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1000 train / 500 test Fashion-MNIST images (n, 28, 28, 1) with labels, fixed draw."""
    rng = np.random.default_rng(0)
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    i, j = rng.choice(len(x), 1000, replace=False), rng.choice(len(xt), 500, replace=False)
    return x[i, ..., None], y[i], xt[j, ..., None], yt[j]


def _nearest_class_mean_accuracy(f: np.ndarray, y: np.ndarray, ft: np.ndarray, yt: np.ndarray) -> float:
    means = np.stack([f[y == c].mean(axis=0) for c in range(10)])
    distances = ((ft[:, None, :] - means[None]) ** 2).sum(axis=-1)
    return float((distances.argmin(axis=1) == yt).mean())


def test_packaged_weights_beat_random_weights(fashion_sample):
    x, y, xt, yt = fashion_sample
    accuracy = {}
    for weights in (None, RANDOM_WEIGHTS):
        extractor = load_image_extractor("efficientnet-lite0", weights, image_size=32)
        f, ft = extractor(x, batch_size=250), extractor(xt, batch_size=250)
        assert f.shape == (1000, 1280) and f.dtype == np.float32 and np.isfinite(f).all()
        accuracy[weights] = _nearest_class_mean_accuracy(f, y, ft, yt)
    # Measured: 0.66 (ImageNet weights) vs 0.39 (random init) on this draw.
    assert accuracy[None] >= 0.6, accuracy
    assert accuracy[None] >= accuracy[RANDOM_WEIGHTS] + 0.15, accuracy


def test_grayscale_input_equals_its_rgb_copy(fashion_sample):
    gray = fashion_sample[0][:8]
    extractor = load_image_extractor(image_size=40)
    np.testing.assert_array_equal(extractor(gray), extractor(np.repeat(gray, 3, axis=-1)))
    np.testing.assert_array_equal(extractor(gray[..., 0]), extractor(gray))  # (n, H, W) is accepted too
    with pytest.raises(DQInputError, match="uint8"):
        extractor(gray.astype(np.float32))


@pytest.mark.parametrize(
    ("name", "suffix"),
    [("timm:test_efficientnet", ".safetensors"), ("torchvision:mobilenet_v3_small", ".pt")],
)
def test_weights_from_file_and_fsspec_url(tmp_path, fashion_sample, name, suffix):
    model = load_classifier(name, RANDOM_WEIGHTS).model
    # Weights unlike the seeded random init, so that a load that did nothing would show.
    state = {k: (v * 1.1 if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    path = tmp_path / f"weights{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)

    images = fashion_sample[0][:16]
    classifier = load_classifier(name, str(path), image_size=32)
    x = classifier.preprocess(images)
    with torch.inference_mode():
        torch.testing.assert_close(classifier.model(x), model(x), rtol=0, atol=0)
    from_path = load_image_extractor(name, str(path))(images)
    assert from_path.shape == (16, backbone_dim(name))
    assert not np.allclose(from_path, load_image_extractor(name, RANDOM_WEIGHTS)(images))
    url = f"file://{path}"
    np.testing.assert_array_equal(load_image_extractor(name, url)(images), from_path)
    assert weights_digest(name, url) == weights_digest(name, str(path)) != weights_digest(name, RANDOM_WEIGHTS)


def test_classifier_gives_imagenet_logits_and_activation_maps(fashion_sample):
    model, target_layer, preprocess = load_classifier(image_size=64)
    x = preprocess(fashion_sample[0][:4])
    assert x.shape == (4, 3, 64, 64)
    with torch.inference_mode():
        assert model(x).shape == (4, 1000)
    cam = gradcam_plus_plus(model, target_layer, x)
    assert cam.shape == (4, 64, 64) and cam.max() == pytest.approx(1.0)


def test_missing_and_corrupt_weights_name_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(DQInputError, match=f"{missing}: weights file not found"):
        load_image_extractor("timm:test_resnet", str(missing))
    with pytest.raises(DQInputError, match="not found"):
        weights_digest("timm:test_resnet", str(missing))

    truncated = tmp_path / "truncated.safetensors"
    save_file({"w": torch.ones(64)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(DQInputError, match=f"{truncated}: not a readable weights file"):
        read_state_dict(str(truncated))

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(DQInputError, match=f"{garbage}: not a readable weights file"):
        load_image_extractor("timm:test_resnet", str(garbage))


def test_arbitrary_pickles_are_refused(tmp_path):
    pickled = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole module: needs unrestricted unpickling
    with pytest.raises(DQInputError, match=f"{pickled}: not a readable weights file"):
        read_state_dict(str(pickled))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet.safetensors"
    state = load_classifier("timm:test_resnet", RANDOM_WEIGHTS).model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(DQInputError, match=f"{path}: weights do not match the architecture"):
        load_image_extractor("timm:test_efficientnet", str(path))


def test_unknown_backbones_list_the_known_ones():
    known = r"known: efficientnet-lite0, timm:<arch>, torchvision:<arch>"
    with pytest.raises(DQInputError, match=rf"unknown backbone 'resnet9000'; {known}"):
        load_image_extractor("resnet9000")
    with pytest.raises(DQInputError, match=r"'no_such_arch' is not one of timm.list_models\(\)"):
        backbone_dim("timm:no_such_arch")
    with pytest.raises(DQInputError, match="torchvision.models.list_models"):
        weights_digest("torchvision:no_such_arch", RANDOM_WEIGHTS)
    with pytest.raises(DQInputError, match="has no packaged weights"):
        load_image_extractor("timm:test_resnet")


@pytest.mark.parametrize("weights", [None, RANDOM_WEIGHTS])
def test_default_backbone_is_timms_tf_efficientnet_lite0_bit_for_bit(fashion_sample, weights):
    # dq_ops.efficientnet_lite rebuilds the network without importing timm: same modules and
    # parameter order, same seeded random init, same features and gradients to the last bit.
    import timm

    from dq_ops.backbone_spec import packaged_lite0_path
    from dq_ops.backbones import _load_architecture, _load_in_order, _seeded_init, read_state_dict

    ours = _load_architecture("efficientnet-lite0", weights).model
    with _seeded_init():
        reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights is None:
        _load_in_order(reference, read_state_dict(packaged_lite0_path()), "packaged")
    reference.eval()
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert list(ours_state) == list(reference_state)
    assert all(torch.equal(ours_state[k], reference_state[k]) for k in ours_state)
    x = torch.from_numpy(fashion_sample[0][:64]).permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1)
    for size in (32, 75):  # odd sizes exercise the asymmetric "SAME" padding
        batch = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear").requires_grad_(True)
        outputs = [model(batch) for model in (ours, reference)]
        assert torch.equal(outputs[0], outputs[1])
        gradients = [torch.autograd.grad(out[:, 3].sum(), batch)[0] for out in outputs]
        assert torch.equal(gradients[0], gradients[1])
