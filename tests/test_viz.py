"""Figure helpers draw what they are given: one rectangle per shown box, masks blended in, PNGs written whole."""
import os
import stat

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle

from asmlp_min.data.shapes import ShapesSegmentation, scenes
from asmlp_min.viz import draw_scenes, plot_curves


def _rectangles(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_draw_scenes_boxes_labels_and_masks():
    batch = scenes(3, seed=10)
    fig = draw_scenes(batch, ncols=2)
    axes = fig.axes
    assert len(axes) == 4 and not axes[3].images                    # 2x2 grid, last panel empty
    for ax, scene in zip(axes, batch):
        assert len(_rectangles(ax)) == len(scene.kinds)
        x1, y1, x2, y2 = scene.boxes_xyxy[0]
        first = _rectangles(ax)[0]
        assert (first.get_x(), first.get_y(), first.get_width(), first.get_height()) == (x1, y1, x2 - x1, y2 - y1)
        shown = ax.images[0].get_array()
        inside = scene.masks[0]
        assert not np.allclose(shown[inside], scene.image[inside] / 255)   # mask colour blended in
        assert np.allclose(shown[scene.semantic == 0], scene.image[scene.semantic == 0] / 255)
    plt.close(fig)


def test_score_threshold_hides_low_scores():
    image = torch.zeros(3, 32, 32)
    target = {"boxes": torch.tensor([[1.0, 1, 10, 10], [5, 5, 20, 20]]), "labels": torch.tensor([1, 2]),
              "scores": torch.tensor([0.9, 0.2])}
    fig = draw_scenes([image], [target], score_threshold=0.5)
    assert len(_rectangles(fig.axes[0])) == 1
    assert [t.get_text() for t in fig.axes[0].texts] == ["circle 0.90"]
    plt.close(fig)


def test_semantic_masks_and_class_titles():
    dataset = ShapesSegmentation(2, seed=11)
    images, masks = zip(*(dataset[i] for i in range(2)))
    fig = draw_scenes(list(images) + list(images), list(masks) + [0, 2])
    shown = fig.axes[0].images[0].get_array()
    image = images[0].permute(1, 2, 0).numpy()
    background = masks[0].numpy() == 0
    assert np.allclose(shown[background], image[background]) and not np.allclose(shown[~background], image[~background])
    assert [ax.get_title() for ax in fig.axes[2:]] == ["circle", "triangle"]
    plt.close(fig)
    with pytest.raises(ValueError, match="targets"):
        draw_scenes([image], [0, 1])


def test_a_semantic_mask_gets_a_legend_of_its_classes_most_pixels_first():
    mask = torch.zeros(10, 10, dtype=torch.int64)
    mask[:, :6] = 2                        # square, 60 pixels
    mask[:3, 6:] = 1                       # circle, 12 pixels; the remaining 28 background, left out
    mask[9, 9] = 255                       # ignored: no entry
    fig = draw_scenes([torch.zeros(3, 10, 10)], [mask])
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["square", "circle"]
    shown = fig.axes[0].images[0].get_array()
    for patch, (row, col) in zip(legend.get_patches(), [(0, 0), (0, 9)]):   # the colour drawn on that class
        assert np.allclose(np.asarray(patch.get_facecolor()[:3]) * 0.45, shown[row, col])
    plt.close(fig)


def test_many_classes_get_their_own_colours_and_the_legend_counts_the_rest():
    """ADE20K has 150 classes: with 10 colours repeated, classes 1 and 11 looked the same."""
    mask = torch.arange(1, 13).repeat_interleave(2).reshape(4, 6)           # classes 1..12, 2 pixels each
    mask[0, 0] = 11                                                          # class 11 first: 3 pixels
    names = [f"class {k}" for k in range(1, 151)]
    fig = draw_scenes([torch.zeros(3, 4, 6)], [mask], names)
    shown = fig.axes[0].images[0].get_array().reshape(-1, 3)
    assert len(np.unique(shown.round(6), axis=0)) == 12
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts[0] == "class 11" and len(texts) == 9 and texts[-1] == "+4 more"
    plt.close(fig)


@pytest.mark.parametrize("classes,coloured", [(["background", "cat"], False), (["wall", "floor"], True)])
def test_predict_colours_class_0_unless_it_is_the_background(classes, coloured):
    """ADE20K's class 0 is "wall", an object like the others; the shapes' class 0 is the background."""
    from asmlp_min.predict import _describe
    image = torch.full((3, 4, 6), 0.5)
    result = torch.zeros(4, 6, dtype=torch.int64)
    result[:, 3:] = 1
    lines, fig, _ = _describe("seg", result, image, classes, None)
    shown = fig.axes[0].images[0].get_array()
    assert lines == [f"{classes[0]} 50.0% of pixels", f"{classes[1]} 50.0% of pixels"]
    assert np.allclose(shown[:, :3], 0.5) != coloured and not np.allclose(shown[:, 3:], 0.5)
    plt.close(fig)


def test_plot_curves_png_gets_normal_permissions_not_mkstemps(tmp_path):
    umask = os.umask(0o022)
    try:
        path = plot_curves([{"epoch": 1, "train_loss": 1.0}], tmp_path / "curves.png")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644                    # 0o666 minus the umask, as open() gives


def test_plot_curves_writes_a_png_and_draws_on_axes(tmp_path):
    history = [{"epoch": 1, "train_loss": 1.0, "val_mIoU": 0.2, "tag": "a"},
               {"epoch": 2, "train_loss": 0.5, "val_mIoU": 0.4, "tag": "b"}]
    path = plot_curves(history, tmp_path / "sub" / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]      # no temporary file left behind
    fig, ax = plt.subplots()
    assert plot_curves(history, ax) is ax
    lines = {line.get_label(): line for a in fig.axes for line in a.get_lines()}
    assert set(lines) == {"train_loss", "val_mIoU"}                       # the string column is skipped
    assert list(lines["val_mIoU"].get_ydata()) == [0.2, 0.4] and list(lines["train_loss"].get_xdata()) == [1, 2]
    plt.close(fig)
    with pytest.raises(ValueError, match="empty"):
        plot_curves([], tmp_path / "x.png")


def test_the_curves_legend_stands_above_the_plot_inside_the_picture(tmp_path, monkeypatch):
    """Inside the axes it covered curves of the twin axes, which loc="best" does not look at."""
    import asmlp_min.viz
    drawn = []
    monkeypatch.setattr(asmlp_min.viz, "save_figure", lambda fig, path: drawn.append(fig))
    history = [{"epoch": e, "train_loss": 2 / e, "val_loss": 2.2 / e, "val_top1": 1 - 1 / e, "val_top5": 1 - 0.5 / e}
               for e in range(1, 11)]
    plot_curves(history, tmp_path / "curves.png")
    (fig,) = drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()
    legend, plot = fig.axes[0].get_legend().get_window_extent(renderer), fig.axes[0].get_window_extent(renderer)
    assert legend.y0 >= plot.y1 - 1 and legend.y1 <= fig.bbox.y1 and 0 <= legend.x0 < legend.x1 <= fig.bbox.x1
    assert len(fig.axes[0].get_legend().get_texts()) == 4
