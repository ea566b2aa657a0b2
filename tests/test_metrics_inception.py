"""InceptionV3 loading from local files, tested with randomly initialised weights."""
import hashlib

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.models import inception as tv_inception

from raygen.metrics import MetricsError, load_extractor
from raygen.metrics.inception import FID_WEIGHTS_FILE, _FIDInceptionA, build_inception


@pytest.fixture(scope="module")
def fid_layout_state():
    torch.manual_seed(0)
    net = build_inception("fid")  # pt_inception-2015-12-05 layout: 1008-way fc, no AuxLogits
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_fid_layout_pth_loads_and_gives_pool3_features(tmp_path, fid_layout_state):
    path = tmp_path / "pt_inception.pth"
    torch.save(fid_layout_state, path)
    ext = load_extractor(f"inception:{path}", batch_size=2)
    sha8 = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    assert ext.name == f"inception-v3-pool3:{sha8}" and ext.dim == 2048
    assert ext.preprocess.size == 299 and ext.preprocess.channels == 3
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))  # grayscale, small
    f1 = ext(images)
    assert f1.shape == (3, 2048) and f1.dtype == torch.float32 and torch.isfinite(f1).all()
    ext.batch_size = 3
    assert torch.allclose(ext(images), f1, atol=1e-5)  # batching does not change features
    assert torch.allclose(ext(images.expand(-1, 3, -1, -1)), f1, atol=1e-5)  # 1->3 channel replication


def test_torchvision_layout_safetensors_with_aux_logits(tmp_path, fid_layout_state):
    state = {k: v for k, v in fid_layout_state.items() if not k.startswith("fc.")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)  # present in torchvision files; ignored
    path = tmp_path / "inception_v3_google.safetensors"
    save_file(state, str(path))
    ext = load_extractor(f"inception:{path}")
    assert ext.name.startswith("inception-v3-tv-pool3:")
    assert ext(torch.rand(2, 3, 8, 8)).shape == (2, 2048)


def test_fid_block_pools_like_tensorflow():
    torch.manual_seed(0)
    tv = tv_inception.InceptionA(192, pool_features=32).eval()
    fid = _FIDInceptionA(192, pool_features=32).eval()
    fid.load_state_dict(tv.state_dict())
    x = torch.randn(1, 192, 7, 7)
    a, b = tv(x), fid(x)
    assert torch.equal(a[:, :-32], b[:, :-32])  # the other branches are untouched
    expected = fid.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
    assert torch.allclose(b[:, -32:], expected) and not torch.allclose(a[:, -32:], b[:, -32:])


def test_missing_or_wrong_weights_say_what_to_do(tmp_path):
    with pytest.raises(MetricsError) as err:
        load_extractor(f"inception:{tmp_path / 'nope.pth'}")
    assert FID_WEIGHTS_FILE in str(err.value) and "nope.pth" in str(err.value) and "domain" in str(err.value)
    bad = tmp_path / "bad.safetensors"
    save_file({"conv.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(MetricsError, match="does not fit InceptionV3"):
        load_extractor(f"inception:{bad}")
    with pytest.raises(MetricsError, match="inception:PATH"):
        load_extractor("inception")
