"""The public API promised in DESIGN.md and the README exists and works end to end on a tiny input."""
import torch

import asmlp_min as am


def test_readme_api_snippet_runs(tmp_path):
    model = am.create_model("asmlp_tiny", num_classes=10, embed_dim=16, depths=(1, 1, 1, 1))
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict()}, path)
    fresh = am.create_model("asmlp_tiny", num_classes=10, embed_dim=16, depths=(1, 1, 1, 1))
    assert am.load_official_checkpoint(fresh, path).ok
    x = torch.randn(1, 3, 97, 131)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    backbone = am.create_model("asmlp_tiny", features_only=True, embed_dim=16, depths=(1, 1, 1, 1))
    assert [f.shape[1] for f in backbone(x)] == [f["num_chs"] for f in backbone.feature_info] == [16, 32, 64, 128]
    assert am.axial_shift(torch.ones(1, 5, 4, 4), shift_size=5, dim=-1).shape == (1, 5, 4, 4)
    assert am.count_params(model) == sum(p.numel() for p in model.parameters())
    assert am.list_models() == ["asmlp_base", "asmlp_mobile", "asmlp_small", "asmlp_tiny"]


def test_dense_prediction_models_are_exported():
    for name in ("SimpleFPNDetector", "build_maskrcnn", "SemanticSegmenter", "UperHead", "FPN",
                 "coco_evaluate", "SegmentationMeter", "ShapesDetection", "export_shapes"):
        assert callable(getattr(am, name)), name
