"""Starting on a state directory that holds a run (fedrest.server.state_dir.prepare_start): --fresh names the run
it sets aside, so the same command run again resumes the new run; settings given that differ from a run with
completed rounds are refused with the fix; a run with no completed round takes them."""

from __future__ import annotations

import logging

import pytest

from conftest import filled_state_dict, make_config, post_update, register
from fedrest.server.state_dir import StartRefused, prepare_start, stored_run


def one_round_done(make_app, **settings):
    app = make_app(communication_rounds=5, evaluator=lambda sd: (0.5, 0.5), **settings)
    client, fed = app.test_client(), app.extensions["federation"]
    node = register(client)
    fed.tick()
    post_update(client, node, 1, filled_state_dict(1.0, 1), {"num_samples": 10})
    fed.tick()
    assert fed.model_version == 1
    fed.stop()
    return fed


def test_fresh_with_the_stored_id_sets_that_run_aside_once(make_app, tmp_path):
    old = one_round_done(make_app)
    new = make_app(fresh=old.run_id).extensions["federation"]
    assert new.run_id != old.run_id and new.model_version == 0
    assert len(list((tmp_path / "temp" / "archive").iterdir())) == 1
    new.stop()
    again = make_app(fresh=old.run_id).extensions["federation"]  # the same command after a crash
    assert again.run_id == new.run_id  # resumed, not thrown away
    assert len(list((tmp_path / "temp" / "archive").iterdir())) == 1


def test_fresh_without_an_id_names_the_id_it_needs(make_app, tmp_path):
    old = one_round_done(make_app)
    for bare in ("?", "true"):
        with pytest.raises(StartRefused, match=f"--fresh={old.run_id}") as refused:
            prepare_start(make_config(tmp_path, fresh=bare))
        assert "1/5 rounds done" in str(refused.value)
    assert stored_run(tmp_path / "temp").run_id == old.run_id  # nothing was set aside


def test_fresh_without_a_stored_run_just_starts_one(tmp_path):
    cfg = make_config(tmp_path, fresh="?")
    assert prepare_start(cfg) is cfg


def test_a_given_setting_that_differs_from_a_run_with_rounds_is_refused_with_the_fix(make_app, tmp_path):
    old = one_round_done(make_app, learning_rate=0.01)
    cfg = make_config(tmp_path, communication_rounds=9, learning_rate=0.05)
    with pytest.raises(StartRefused) as refused:
        prepare_start(cfg, explicit={"communication_rounds", "learning_rate", "port"})
    message = str(refused.value)
    assert "--rounds=5" in message and "--rounds=9" in message  # the spelling users type
    assert "--lr=0.01" in message and "--lr=0.05" in message
    assert f"--fresh={old.run_id}" in message


def test_settings_not_given_are_taken_from_the_run(make_app, tmp_path, caplog):
    one_round_done(make_app, learning_rate=0.01)
    with caplog.at_level(logging.WARNING, logger="fl.federation"):
        cfg = prepare_start(make_config(tmp_path, learning_rate=0.05), explicit={"port"})
    assert (cfg.learning_rate, cfg.communication_rounds) == (0.01, 5)
    assert any("keeping its settings" in r.getMessage() for r in caplog.records)



@pytest.mark.parametrize("argv, kept", [
    (["--rounds", "3", "--fresh", "abc123", "--no-eval"], "--rounds 3 --no-eval"),
    (["--rounds", "3", "--fresh=abc123"], "--rounds 3"),
    (["--fresh", "--no-eval"], "--no-eval"),
    (["--port", "5000", "--fresh"], "--port 5000"),
])
def test_the_printed_fresh_command_replaces_any_fresh_the_command_had(argv, kept):
    import coordinator

    command = coordinator._fresh_command(argv, "def456")
    assert command.endswith(f"coordinator.py {kept} --fresh=def456")
    assert "abc123" not in command
