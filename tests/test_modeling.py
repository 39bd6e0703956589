import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel

from metashield_hf import MetaShieldConfig, MetaShieldDetector, load_detector, save_for_hub
from metashield_hf.features import feature_names


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return MetaShieldDetector(MetaShieldConfig(feature_names=feature_names()))


def test_default_config_is_under_100k_parameters(detector):
    n = sum(p.numel() for p in detector.parameters())
    assert 1_000 < n < 100_000, n


def test_config_validation():
    with pytest.raises(ValueError, match="disagrees with len"):
        MetaShieldConfig(feature_names=["a", "b"], feature_dim=3)
    with pytest.raises(ValueError, match="z_clip"):
        MetaShieldConfig(z_clip=0)


def test_forward_shapes_scores_and_loss(detector):
    f = detector.config.feature_dim
    out = detector(features=torch.randn(5, f), reference_features=torch.randn(12, f), labels=torch.ones(5))
    assert out.scores.shape == (5,) and ((out.scores >= 0) & (out.scores <= 1)).all()
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="features must be"):
        detector(features=torch.randn(5, f + 1), reference_features=torch.randn(12, f))
    with pytest.raises(ValueError, match="N>=2"):
        detector(features=torch.randn(5, f), reference_features=torch.randn(1, f))


def test_untrained_prior_ranks_far_inputs_higher(detector):
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(20, detector.config.feature_dim, generator=g)
    near = torch.randn(10, detector.config.feature_dim, generator=g)
    far = near + 6.0
    with torch.no_grad():
        s_near = detector(features=near, reference_features=ref).scores
        s_far = detector(features=far, reference_features=ref).scores
    assert s_far.min() > s_near.max()


def test_constant_reference_feature_stays_finite(detector):
    f = detector.config.feature_dim
    ref = torch.zeros(6, f)
    out = detector(features=torch.full((3, f), 1e6), reference_features=ref)
    assert torch.isfinite(out.logits).all()


def test_save_and_auto_load_roundtrip(detector, tmp_path):
    detector.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "metashield"
    assert config["auto_map"]["AutoModel"] == "modeling_metashield.MetaShieldDetector"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MetaShieldConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, MetaShieldDetector)
    x, r = torch.randn(4, detector.config.feature_dim), torch.randn(9, detector.config.feature_dim)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, r).logits, detector(x, r).logits)


def test_save_for_hub_writes_exactly_what_the_hub_needs(detector, tmp_path):
    files = save_for_hub(detector, tmp_path)
    assert files == sorted(
        [
            "README.md",
            "config.json",
            "configuration_metashield.py",
            "model.safetensors",
            "modeling_metashield.py",
            "pipeline_backdoor_detection.py",
        ]
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["custom_pipelines"]["backdoor-detection"]["impl"] == (
        "pipeline_backdoor_detection.BackdoorDetectionPipeline"
    )
    assert config["custom_pipelines"]["backdoor-detection"]["pt"] == ["AutoModel"]
    assert "pip install metashield-hf" in (tmp_path / "README.md").read_text()


def test_remote_code_loads_without_the_package(detector, tmp_path):
    folder = tmp_path / "hub_copy"
    save_for_hub(detector, folder)
    x = torch.randn(3, detector.config.feature_dim, generator=torch.Generator().manual_seed(3))
    r = torch.randn(8, detector.config.feature_dim, generator=torch.Generator().manual_seed(4))
    torch.save({"x": x, "r": r, "logits": detector(x, r).logits.detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["metashield_hf"] = None      # hide the installed package: any import of it now fails
        try:
            import metashield_hf
        except ImportError:
            pass
        else:
            raise SystemExit("package still importable")
        import torch
        from transformers import AutoModel
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        try:
            AutoModel.from_pretrained({str(folder)!r})
        except ValueError as err:
            assert "custom code" in str(err) or "trust_remote_code" in str(err), err
        else:
            raise SystemExit("loaded without trust_remote_code")
        m = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        torch.testing.assert_close(m(io["x"], io["r"]).logits, io["logits"])
        print("REMOTE-OK")
    """)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "REMOTE-OK" in proc.stdout, proc.stderr[-3000:]


def test_embedded_default_detector_loads():
    from metashield_hf.probes import LiveEvidence

    det = load_detector()
    assert isinstance(det, MetaShieldDetector)
    live = LiveEvidence(det.config.probes, probe_passes=det.config.probe_passes).feature_names
    assert det.config.feature_names == feature_names(det.config.feature_groups) + live
    one_pass = load_detector(one_pass=True)  # what the scan and the FL screen read activations with
    assert one_pass.config.probes == [] and one_pass.config.feature_names == feature_names(
        one_pass.config.feature_groups
    )
