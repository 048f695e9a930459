import json

import numpy as np
import pytest
import torch

from ee_diffusion import ExitSchedule
from ee_diffusion.schedules import DROP, REUSE, cached_tail


def test_linear_runs_all_blocks_at_data_end_and_min_at_noise_end():
    schedule = ExitSchedule.linear(num_blocks=28, min_blocks=14)
    assert schedule.blocks_at(0) == 28
    assert schedule.blocks_at(999) == 14
    assert schedule.blocks_at(500) == 21
    depths = schedule.depths_for(range(0, 1000, 10))
    assert depths == sorted(depths, reverse=True)


def test_cosine_is_flat_at_both_ends_and_non_increasing():
    schedule = ExitSchedule.cosine(num_blocks=12, min_blocks=4)
    assert schedule.blocks_at(0) == 12 and schedule.blocks_at(999) == 4
    assert schedule.blocks_at(500) == 8
    depths = schedule.depths_for(torch.arange(1000))
    assert depths == sorted(depths, reverse=True)
    linear = ExitSchedule.linear(12, 4)
    assert schedule.blocks_at(100) > linear.blocks_at(100)  # cosine stays deeper near the data end


def test_constant():
    schedule = ExitSchedule.constant(num_blocks=6, blocks=3)
    assert set(schedule.depths_for(range(1000))) == {3}


def test_step_matches_released_ase_buckets():
    table = [28, 28, 24, 24, 20, 20, 16, 16, 12, 12]
    schedule = ExitSchedule.step(28, table)
    for t in range(1000):
        assert schedule.blocks_at(t) == table[t // 100]
    assert schedule.blocks_at(1000) == 12  # the noise end is the last bucket


def test_from_table_interpolates_rounds_up_and_clamps():
    schedule = ExitSchedule.from_table(12, timesteps=[800, 100, 500], depths=[4, 12, 8])
    assert schedule.config.timesteps == [100.0, 500.0, 800.0]  # sorted
    assert schedule.blocks_at(0) == 12 and schedule.blocks_at(100) == 12
    assert schedule.blocks_at(500) == 8 and schedule.blocks_at(999) == 4
    assert schedule.blocks_at(300) == 10
    assert schedule.blocks_at(301) == 10  # 9.99 rounds up
    assert schedule.blocks_at(650) == 6


def test_blocks_at_other_num_train_timesteps_and_tensor_input():
    schedule = ExitSchedule.linear(10, 2)
    assert schedule.blocks_at(torch.tensor(50.0), num_train_timesteps=100) == schedule.blocks_at(500)
    assert schedule.blocks_at(torch.tensor([999])) == 2
    with pytest.raises(ValueError, match="one timestep"):
        schedule.blocks_at(torch.tensor([1, 2]))


def test_compute_fraction():
    schedule = ExitSchedule.step(4, [4, 2])
    assert schedule.compute_fraction([100, 900]) == pytest.approx(0.75)
    assert schedule.compute_fraction(torch.tensor([900, 800])) == pytest.approx(0.5)
    assert ExitSchedule.constant(8, 8).compute_fraction(range(0, 1000, 20)) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        schedule.compute_fraction([])


@pytest.mark.parametrize(
    "factory",
    [
        lambda: ExitSchedule.linear(28, 14),
        lambda: ExitSchedule.cosine(12, 3),
        lambda: ExitSchedule.constant(6, 6),
        lambda: ExitSchedule.step(28, [28, 28, 24, 24, 20, 20, 16, 16, 12, 12]),
        lambda: ExitSchedule.from_table(12, [10.5, 400, 990], [12, 9, 3], num_train_timesteps=1000),
    ],
)
def test_save_pretrained_round_trip(tmp_path, factory):
    schedule = factory()
    schedule.save_pretrained(tmp_path)
    assert (tmp_path / "exit_schedule.json").is_file()
    loaded = ExitSchedule.from_pretrained(tmp_path)
    assert loaded == schedule
    assert loaded.depths_for(range(1000)) == schedule.depths_for(range(1000))
    assert ExitSchedule.from_config(schedule.config) == schedule
    assert json.loads((tmp_path / "exit_schedule.json").read_text())["shape"] == schedule.config.shape


def test_equality_distinguishes_schedules():
    assert ExitSchedule.linear(28, 14) != ExitSchedule.linear(28, 15)
    assert ExitSchedule.linear(28, 14) != ExitSchedule.cosine(28, 14)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: ExitSchedule.linear(0, 1), "num_blocks"),
        (lambda: ExitSchedule.linear(12, 0), r"in \[1, num_blocks=12\], got 0"),
        (lambda: ExitSchedule.linear(12, 13), r"in \[1, num_blocks=12\], got 13"),
        (lambda: ExitSchedule.cosine(12, -1), "got -1"),
        (lambda: ExitSchedule.step(12, []), "non-empty `table`"),
        (lambda: ExitSchedule.step(12, [12, 13]), "got 13"),
        (lambda: ExitSchedule.step(12, [8, 12]), r"increases with noise \(8 -> 12"),
        (lambda: ExitSchedule.from_table(12, [0, 500], [12]), "same length, got 2 and 1"),
        (lambda: ExitSchedule.from_table(12, [100, 100], [12, 6]), "strictly increasing"),
        (lambda: ExitSchedule.from_table(12, [0, 1500], [12, 6]), r"\[0, num_train_timesteps=1000\]"),
        (lambda: ExitSchedule.from_table(12, [0, 500], [4, 12]), "increases with noise"),
        (lambda: ExitSchedule(num_blocks=12, shape="zigzag"), "`shape` must be one of"),
        (lambda: ExitSchedule(num_blocks=12, shape="linear"), "needs `min_blocks`"),
        (lambda: ExitSchedule.from_spec("linear:-0.5", 12), r"'linear:-0.5': .* must lie in \(0, 1\], got -0.5"),
        (lambda: ExitSchedule.from_spec("step:1.0,1.5", 12), r"must lie in \(0, 1\], got 1.5"),
        (lambda: ExitSchedule.from_spec("step:12,6.9x", 12), "Bad exit schedule 'step:12,6.9x'"),
        (lambda: ExitSchedule.constant(12, 13), "got 13"),
        (lambda: ExitSchedule.constant(12, 0), "got 0"),
        (lambda: ExitSchedule.from_table(12, [0, 500], [13, 6]), "got 13"),
        (lambda: ExitSchedule.linear(12, 4).blocks_at(500, 0), "`num_train_timesteps` must be an integer >= 1"),
        (lambda: ExitSchedule.linear(12, 4).blocks_at(500, -1000), "`num_train_timesteps` must be an integer >= 1"),
        (lambda: ExitSchedule.linear(12, 4).compute_fraction([500.0], -1), "`num_train_timesteps` must be an"),
        (lambda: ExitSchedule.linear(12, 4).blocks_at(float("nan")), r"`t` must be finite numbers, got \[nan\]"),
        (lambda: ExitSchedule.linear(12, 4).depths_for([500, float("inf")]), "`timesteps` must be finite"),
        (lambda: ExitSchedule.plan(12, [500, 999], [6, 12]).check_timesteps([float("nan")]), "must be finite"),
    ],
)
def test_bad_arguments_raise_clear_errors(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: ExitSchedule.linear(12.0, 4), "`num_blocks` must be an integer"),
        (lambda: ExitSchedule.constant(12, 2.5), "got 2.5"),
        (lambda: ExitSchedule.constant(12, True), "`min_blocks` must be an integer, got True"),
        (lambda: ExitSchedule.step(12, [12.9, 6.5]), "`table` must be an integer, got 12.9"),  # never truncated
        (lambda: ExitSchedule.from_table(12, [0, 500], [12, 6.5]), "`depths` must be an integer"),
        (lambda: ExitSchedule.step(12, 12), "`table` must be a sequence of integers, got 12"),
        (lambda: ExitSchedule.from_table(12, None, [12]), "`timesteps` must be a number, a sequence"),
        (lambda: ExitSchedule.from_table(12, ["a", 5], [12, 6]), r"`timesteps` must hold numbers, got \['a', 5\]"),
        (lambda: ExitSchedule.step(12, [4, 8], allow_increasing="no"), "`allow_increasing` must be True or False"),
        (lambda: ExitSchedule.linear(12, 4).blocks_at(500, 1000.5), "`num_train_timesteps` must be an integer"),
    ],
)
def test_depths_of_the_wrong_type_raise_type_errors(factory, message):
    with pytest.raises(TypeError, match=message):
        factory()


def test_numpy_and_torch_integers_are_depths_and_save_as_plain_ints(tmp_path):
    schedule = ExitSchedule.step(np.int64(12), [np.int32(12), torch.tensor(6)])
    assert schedule == ExitSchedule.step(12, [12, 6]) and type(schedule.config.table[1]) is int
    schedule.save_pretrained(tmp_path)
    assert ExitSchedule.from_pretrained(tmp_path) == schedule


def test_increasing_table_is_allowed_on_purpose():
    schedule = ExitSchedule.step(12, [6, 12], allow_increasing=True)
    assert schedule.blocks_at(0) == 6 and schedule.blocks_at(999) == 12
    table = ExitSchedule.from_table(12, [0, 999], [4, 12], allow_increasing=True)
    assert table.blocks_at(999) == 12


def test_loading_a_tampered_file_validates(tmp_path):
    ExitSchedule.linear(12, 6).save_pretrained(tmp_path)
    path = tmp_path / "exit_schedule.json"
    config = json.loads(path.read_text())
    config["min_blocks"] = 40
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="got 40"):
        ExitSchedule.from_pretrained(tmp_path)


def test_from_spec(tmp_path):
    assert ExitSchedule.from_spec("linear:0.5", 12) == ExitSchedule.linear(12, 6)
    assert ExitSchedule.from_spec("cosine:3", 12) == ExitSchedule.cosine(12, 3)
    assert ExitSchedule.from_spec("constant:1.0", 12) == ExitSchedule.constant(12, 12)
    assert ExitSchedule.from_spec("step:12,12,8,4", 12) == ExitSchedule.step(12, [12, 12, 8, 4])
    ExitSchedule.linear(12, 4).save_pretrained(tmp_path)
    assert ExitSchedule.from_spec(str(tmp_path), 12) == ExitSchedule.linear(12, 4)
    for bad in ["linear", "linear:x", "zigzag:3", "step:12,a", "linear:13"]:
        with pytest.raises(ValueError, match="Bad exit schedule"):
            ExitSchedule.from_spec(bad, 12)


def test_from_spec_step_fractions():
    assert ExitSchedule.from_spec("step:1.0,1.0,0.5,0.25", 12) == ExitSchedule.step(12, [12, 12, 6, 3])


def test_a_plan_gives_each_step_its_action_and_the_nearest_step_in_between(tmp_path):
    plan = ExitSchedule.plan(4, torch.tensor([999, 666, 333, 0]), [4, REUSE, 2, 3])
    assert plan.config.timesteps == [0.0, 333.0, 666.0, 999.0] and plan.config.depths == [3, 2, REUSE, 4]
    assert plan.depths_for([999, 666, 333, 0, 700, 100]) == [4, REUSE, 2, 3, REUSE, 3]
    assert plan.reuses and not ExitSchedule.plan(4, [999, 0], [4, 2]).reuses
    assert plan.compute_fraction([999, 666, 333, 0]) == (4 + 0 + 2 + 3) / 16
    plan.save_pretrained(tmp_path)
    assert ExitSchedule.from_pretrained(tmp_path) == plan


@pytest.mark.parametrize(
    ("factory", "error", "message"),
    [
        (lambda: ExitSchedule.plan(4, [999, 500], [REUSE, 4]), ValueError, "first sampling step .* cannot reuse"),
        (lambda: ExitSchedule.plan(4, [999, 500], [4]), ValueError, "same length, got 2 and 1"),
        (lambda: ExitSchedule.plan(4, [999, 999], [4, 2]), ValueError, "`timesteps` must be distinct"),
        (lambda: ExitSchedule.plan(4, [999, 500], [4, 5]), ValueError, r"in \[1, num_blocks=4\], got 5"),
        (lambda: ExitSchedule.plan(4, [999, 500], [4, -4]), ValueError, r"cached tails must be .*\[0, 3\].* got 4"),
        (lambda: ExitSchedule.plan(4, [999, 500], [4, "skip"]), TypeError, "`actions` must be an integer"),
        (lambda: ExitSchedule.plan(4, [999, 500], [DROP, 4]), ValueError, "cannot reuse, add a cached tail or be"),
        (lambda: ExitSchedule.plan(4, [999, 500], [cached_tail(2), 4]), ValueError, "got tail:2"),
        (lambda: ExitSchedule.plan(4, [999, 500], [4, 2.5]), TypeError, "`actions` must be an integer, got 2.5"),
        (lambda: ExitSchedule.plan(4, [999, 1500], [4, 2]), ValueError, "must lie in"),
    ],
)
def test_bad_plans_raise_clear_errors(factory, error, message):
    with pytest.raises(error, match=message):
        factory()
