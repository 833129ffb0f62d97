"""`featdp.demo`: the main job as a library, yielding each table row as soon as its fits are done."""

from __future__ import annotations

import json

import pytest

from conftest import write_feature_file
from featdp import progress
from featdp.accounting import PrivacyParameterError
from featdp.demo import Demo
from featdp.methods import method_names


def test_rows_arrive_one_method_at_a_time_with_every_head_written(tmp_path, monkeypatch):
    import featdp.jobs

    demo = Demo(out=tmp_path, epsilons=(1, 3), limit=40)
    write_feature_file(demo.features)  # stands in for the extraction
    fitted = []
    real = featdp.jobs.fit_feature_file

    def counted(*args, **kwargs):
        fitted.append(kwargs["out_dir"].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(featdp.jobs, "fit_feature_file", counted)
    updates = []
    with progress.reporting(updates.append):
        rows = demo.rows()
        first = next(rows)
        # The first row exists after its own two fits, before any other method has run.
        assert fitted == [f"{first.label}_eps1", f"{first.label}_eps3"] and len(first.accuracies) == 2
        rest = list(rows)
    private = method_names(private=True)
    assert [row.label for row in (first, *rest)] == [
        *private, "dp-sgd (recipe=auto)", "dp-sgd (Tramèr–Boneh recipe)",
        *(f"{name} (non-private)" for name in method_names(private=False))]
    assert [len(row.accuracies) for row in rest[-2:]] == [1, 1] and not rest[-1].private
    assert len(fitted) == 2 * (len(private) + 2) + 2 == len({*fitted})
    auto = json.loads((tmp_path / "dp-sgd-auto_eps1" / "privacy_report.json").read_text())
    assert auto["hyperparameters"]["recipe"] == "manual" and auto["hyperparameters"]["steps"] > 1
    recipe = json.loads((tmp_path / "dp-sgd-recipe_eps3" / "privacy_report.json").read_text())
    assert recipe["hyperparameters"]["batch_size"] == demo.recipe["batch_size"] == round(40 * 8192 / 60000)
    demo_fits = [(u.done, u.total) for u in updates if u.task == "demo fits"]
    assert demo_fits[0] == (0, len(fitted)) and demo_fits[-1] == (len(fitted), len(fitted))


def test_bad_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(PrivacyParameterError, match="epsilon"):
        Demo(out=tmp_path / "d", epsilons=(1, -3))
    with pytest.raises(PrivacyParameterError, match="delta"):
        Demo(out=tmp_path / "d", delta=2.0)
    assert not (tmp_path / "d").exists()


def test_the_recipe_command_and_the_published_figure_follow_the_settings(tmp_path):
    full = Demo(out=tmp_path)
    assert full.recipe_command() == ("featdp fit --method dp-sgd --set clip_norm=63 --set steps=293 --set "
                                     "batch_size=8192 --set grad_clip=0.1 --set lr=16 --set momentum=0.9")
    assert "89.7%" in full.published
    assert Demo(out=tmp_path, limit=100).published is None
    assert Demo(out=tmp_path, backbone="efficientnet-lite0").published is None


@pytest.mark.parametrize("backbone", ["scatternet+", "+scatternet", "scatternet+scatternet"])
def test_a_combination_names_different_backbones(tmp_path, backbone):
    from featdp.extraction.extract import ExtractError

    with pytest.raises(ExtractError, match="joined by '\\+'"):
        Demo(out=tmp_path, backbone=backbone)


def test_several_backbones_get_a_file_each_and_the_methods_their_combination(tmp_path):
    demo = Demo(out=tmp_path, backbone="scatternet+efficientnet-lite0", limit=30)
    assert demo.backbones == ("scatternet", "efficientnet-lite0")
    assert demo.features.name == "fashion_mnist_scatternet+efficientnet-lite0_first30.h5"
    assert demo.backbone_file("scatternet").name == "fashion_mnist_scatternet_first30.h5"
    assert "89.7%" in Demo(out=tmp_path, backbone="scatternet+efficientnet-lite0").published


def test_every_backbone_of_a_combination_is_known_before_any_extraction(tmp_path):
    from featdp.extraction.backbones.registry import BackboneError

    with pytest.raises(BackboneError, match="unknown backbone 'nope'"):
        Demo(out=tmp_path / "d", backbone="scatternet+nope")
    assert not (tmp_path / "d").exists()
