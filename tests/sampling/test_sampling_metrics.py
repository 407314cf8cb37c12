from lightning_grass.sampling.sampling_metrics import log_record_metrics, metrics_of_record


class ListLogger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def test_a_fixed_mode_record_logs_the_active_layers_and_draw_shares_only():
    record = {"step": 3, "active_layers": [1], "importance": None, "probabilities": None, "effective_layers": None}
    record["draw_share"] = [0.0, 1.0]
    loggers = [ListLogger(), ListLogger()]
    log_record_metrics(loggers, record)
    expected = {
        "grass/active/layer_00": 0.0,
        "grass/draw_share/layer_00": 0.0,
        "grass/active/layer_01": 1.0,
        "grass/draw_share/layer_01": 1.0,
    }
    assert [logger.logged for logger in loggers] == [[(3, expected)]] * 2


def test_a_sampled_record_logs_every_value_in_order():
    record = {"step": 5, "active_layers": [0], "importance": [2.0, 1.0], "probabilities": [0.75, 0.25]}
    record.update(effective_layers=1.8, draw_share=[0.5, 0.5])
    assert list(metrics_of_record(record).items()) == [
        ("grass/effective_layers", 1.8),
        ("grass/active/layer_00", 1.0),
        ("grass/draw_share/layer_00", 0.5),
        ("grass/probability/layer_00", 0.75),
        ("grass/importance/layer_00", 2.0),
        ("grass/active/layer_01", 0.0),
        ("grass/draw_share/layer_01", 0.5),
        ("grass/probability/layer_01", 0.25),
        ("grass/importance/layer_01", 1.0),
    ]


def test_a_module_record_logs_each_module_by_its_index():
    record = {"step": 4, "active_units": [1], "active_layers": [0], "importance": [2.0, 1.0], "probabilities": None}
    record.update(effective_layers=None, draw_share=[0.0, 1.0])
    assert metrics_of_record(record, "module") == {
        "grass/active/module_000": 0.0,
        "grass/draw_share/module_000": 0.0,
        "grass/importance/module_000": 2.0,
        "grass/active/module_001": 1.0,
        "grass/draw_share/module_001": 1.0,
        "grass/importance/module_001": 1.0,
    }
