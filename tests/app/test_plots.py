import pytest

from lightning_grass.app import plots

HISTORY = [
    {
        "step": 2,
        "active_layers": [0, 2],
        "importance": [1.0, 2.0, 3.0],
        "probabilities": [0.2, 0.3, 0.5],
        "resampled": True,
        "refreshed": True,
    },
    {
        "step": 3,
        "active_layers": [0, 2],
        "importance": [1.5, 2.0, 2.5],
        "probabilities": [0.3, 0.3, 0.4],
        "resampled": False,
        "refreshed": True,
    },
    {
        "step": 4,
        "active_layers": [1, 2],
        "importance": [1.5, 2.0, 2.5],
        "probabilities": [0.3, 0.3, 0.4],
        "resampled": True,
        "refreshed": False,
    },
]
LISA_HISTORY = [
    {
        "step": 0,
        "active_layers": [3],
        "importance": None,
        "probabilities": [0.25] * 4,
        "resampled": True,
        "refreshed": False,
    },
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_selection_counts_count_resamples_only():
    assert plots.selection_counts(HISTORY, 3) == [1, 1, 2]


def test_selection_counts_leave_out_a_draw_after_which_no_step_ran():
    history = [{**record, "trained": True} for record in HISTORY[:2]] + [{**HISTORY[2], "trained": False}]
    assert plots.selection_counts(history, 3) == [1, 0, 1]


@pytest.mark.parametrize("value", ["importance", "probabilities"])
def test_heatmap_is_written_as_png(tmp_path, value):
    path = plots.importance_heatmap(HISTORY, tmp_path / "deep" / "heatmap.png", value=value)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_selection_frequency_is_written_as_png_and_infers_layer_count(tmp_path):
    path = plots.selection_frequency(LISA_HISTORY, tmp_path / "selection.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_heatmap_without_importance_says_why(tmp_path):
    with pytest.raises(ValueError, match="no history record has 'importance'"):
        plots.importance_heatmap(LISA_HISTORY, tmp_path / "x.png")
    with pytest.raises(ValueError, match="value='loss' is not supported"):
        plots.importance_heatmap(HISTORY, tmp_path / "x.png", value="loss")


def test_sampling_diagnostics_draws_the_spread_and_the_shares(tmp_path):
    history = [dict(record, effective_layers=2.5, draw_share=[0.5, 0.0, 0.5]) for record in HISTORY]
    path = plots.sampling_diagnostics(history, tmp_path / "sampling.png")
    assert path.stat().st_size > 10_000
    assert plots.sampling_diagnostics(LISA_HISTORY, tmp_path / "lisa.png").stat().st_size > 10_000


MODULE_NAMES = ["0.attn.q", "0.mlp.up", "1.attn.q", "1.mlp.up", "1.mlp.gate"]
MODULE_HISTORY = [
    {"step": 2, "active_units": [0, 3], "active_layers": [0, 1], "resampled": True, "trained": True},
    {"step": 4, "active_units": [3, 4], "active_layers": [1], "resampled": True, "trained": True},
    {"step": 6, "active_units": [1], "active_layers": [0], "resampled": True, "trained": False},
]


def test_module_draws_are_counted_per_module_and_per_layer():
    assert plots.selection_counts(MODULE_HISTORY, 5) == [1, 0, 0, 2, 1]
    assert plots.selection_counts(MODULE_HISTORY, 2, key="active_layers") == [1, 2]


def test_module_draws_are_drawn_as_a_grid_of_kinds_by_layers(tmp_path):
    path = plots.selection_frequency(MODULE_HISTORY, tmp_path / "selection.png", 5, MODULE_NAMES)
    assert path.read_bytes()[:8] == PNG_MAGIC
    figure = plots.Figure()
    axes = figure.subplots()
    plots._module_grid(figure, axes, [1, 0, 0, 2, 1], MODULE_NAMES, "windows active")
    assert [label.get_text() for label in axes.get_yticklabels()] == ["attn.q", "mlp.up", "mlp.gate"]
    grid = axes.images[0].get_array()
    assert grid.tolist()[:2] == [[1, 0], [0, 2]] and grid.mask.tolist()[2] == [True, False], "no gate in layer 0"
    assert plots.sampling_diagnostics(MODULE_HISTORY, tmp_path / "sampling.png", 5, MODULE_NAMES).is_file()
