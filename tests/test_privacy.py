"""Central differential privacy (DP-FedAvg): clipping and the noise's scale (statistically, with fixed seeds),
Poisson sampling, the epsilon reported everywhere against dp-accounting's own value, the budget stop and the
refused combinations."""

from __future__ import annotations

import io
import math
from collections import OrderedDict

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from rich.console import Console

import launch
import text_monitor
from config import Config, ConfigError
from fedrest.aggregation import ClientUpdate
from fedrest.aggregation.private_mean import PrivateMean, round_noise_seed
from fedrest.privacy import epsilon_spent, rounds_within_budget
from fedrest.server.rounds import Phase, RoundFacts, Settings, decide, poisson_participants
from fedrest.server.state_dir import StartRefused
from fedrest.tasks import TaskError
from test_metrics import scrape
from conftest import MONITOR, filled_state_dict, post_update, register

WIDTH = 200_000  # coordinates: enough for the noise's statistics to be tight


def accountant_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    """dp-accounting's own answer, straight from its API."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
    return accountant.get_epsilon(delta)


def reference():
    return OrderedDict(w=torch.zeros(WIDTH), n=torch.tensor(5))


def update(value: float) -> OrderedDict:
    return OrderedDict(w=torch.full((WIDTH,), value), n=torch.tensor(9))


# ----------------------------------------------------------------------------- the mechanism


def test_each_change_is_clipped_to_s_and_weighted_alike_whatever_its_samples():
    mechanism = PrivateMean(clip_norm=2.0, noise_multiplier=0.0, sampling_rate=0.5)
    # norms: 0.001 * sqrt(WIDTH) = 0.447 (kept), 1.0 * sqrt(WIDTH) = 447 (clipped to 2)
    small, big = update(0.001), update(1.0)
    result = mechanism.combine([ClientUpdate.of("a", small, 1), ClientUpdate.of("b", big, 10**9)], reference(),
                               num_clients=4, noise_seed=1)
    w = result.state_dict["w"].double()
    expected = (0.001 + 2.0 / math.sqrt(WIDTH)) / (0.5 * 4)  # (sum of the clipped changes) / (q * N)
    assert torch.allclose(w, torch.full_like(w, expected), rtol=1e-6)
    assert result.clipped == 1 and result.used == ["a", "b"]
    assert result.state_dict["n"].item() == 5  # integer buffers keep the global model's value


def test_noise_never_makes_a_running_variance_negative():
    mechanism = PrivateMean(clip_norm=1.0, noise_multiplier=50.0, sampling_rate=0.5)
    ref = OrderedDict(**{"bn.running_var": torch.ones(1000), "bn.running_mean": torch.zeros(1000)})
    out = mechanism.combine([], ref, num_clients=2, noise_seed=3).state_dict
    assert float(out["bn.running_var"].min()) == 0.0  # noise of std 50 pushed some below 0: kept at 0
    assert float(out["bn.running_mean"].min()) < -10  # other tensors take the noise as it is


def test_the_noise_is_gaussian_with_std_z_times_s_over_the_denominator():
    z, s, q, n = 1.5, 0.8, 0.25, 20
    mechanism = PrivateMean(clip_norm=s, noise_multiplier=z, sampling_rate=q)
    result = mechanism.combine([], reference(), num_clients=n, noise_seed=12345)  # an empty sample: noise alone
    noise = result.state_dict["w"].double() * (q * n)  # back to the scale of the sum
    assert abs(float(noise.mean())) < 4 * z * s / math.sqrt(WIDTH)  # mean 0 (4 standard errors)
    assert float(noise.std()) == pytest.approx(z * s, rel=0.01)  # std z * S (its standard error is 0.16%)
    within_one = float((noise.abs() < z * s).double().mean())
    assert within_one == pytest.approx(0.6827, abs=0.005)  # the normal's 68.27% within one std
    again = mechanism.combine([], reference(), num_clients=n, noise_seed=12345).state_dict["w"]
    other = mechanism.combine([], reference(), num_clients=n, noise_seed=54321).state_dict["w"]
    assert torch.equal(again, result.state_dict["w"]) and not torch.equal(other, again)


def test_noise_seeds_and_samples_come_from_the_secret_key():
    assert round_noise_seed(b"k" * 32, 3) == round_noise_seed(b"k" * 32, 3)
    assert round_noise_seed(b"k" * 32, 3) != round_noise_seed(b"j" * 32, 3) != round_noise_seed(b"k" * 32, 4)
    online = [f"node{i:03d}" for i in range(200)]
    drawn = [poisson_participants(online, 0.25, b"k" * 32, r, 1) for r in range(1, 41)]
    assert drawn[0] == poisson_participants(list(reversed(online)), 0.25, b"k" * 32, 1, 1)[::-1]
    assert drawn[0] != poisson_participants(online, 0.25, b"j" * 32, 1, 1)
    sizes = [len(d) for d in drawn]
    assert sum(sizes) / len(sizes) == pytest.approx(50, abs=3)  # q * N on average (std of the mean 0.97)
    assert len(set(sizes)) > 5  # Poisson sampling: the size varies


def test_an_empty_poisson_sample_is_aggregated_at_once_with_dp_and_started_again_without():
    facts = RoundFacts(phase=Phase.TRAINING, now=0.0, participants=(), online=frozenset({"a", "b"}))
    assert decide(facts, Settings(1, 1, 60.0, release_empty=True)).action.name == "AGGREGATE"
    assert decide(facts, Settings(1, 1, 60.0)).action.name == "REOPEN"


# ----------------------------------------------------------------------------- accounting


def test_epsilon_is_the_accountants_own_value():
    for q, z, rounds in ((0.25, 1.0, 40), (0.02, 0.8, 300), (1.0, 4.0, 10)):
        assert epsilon_spent(q, z, rounds, 1e-5) == accountant_epsilon(q, z, rounds, 1e-5)
    assert epsilon_spent(0.25, 1.0, 0, 1e-5) == 0.0
    allowed = rounds_within_budget(0.25, 1.0, 1e-5, 5.0, 1000)
    assert epsilon_spent(0.25, 1.0, allowed, 1e-5) <= 5.0 < epsilon_spent(0.25, 1.0, allowed + 1, 1e-5)


def dp_app(make_app, **config):
    settings = dict(min_nodes_to_start=4, client_fraction=0.5, clip_norm=1.0, dp_noise_multiplier=1.0,
                    dp_delta=1e-5, communication_rounds=5)
    settings.update(config)
    app = make_app(**settings)
    client, fed = app.test_client(), app.extensions["federation"]
    nodes = {n: register(client, n, num_samples=50) for n in ("a", "b", "c", "d")}
    return client, fed, nodes


def run_round(client, fed, nodes) -> None:
    fed.tick()
    number = fed.round
    for name in fed.state.participants:
        node = next(n for n in nodes.values() if n["node_id"] == name)
        assert post_update(client, node, number, filled_state_dict(0.01 * number, 1), {"num_samples": 50}
                           ).status_code == 202
    fed.tick()
    assert fed.model_version == number


def test_the_epsilon_spent_is_reported_in_the_status_history_metrics_and_monitor(make_app):
    client, fed, nodes = dp_app(make_app)
    status = client.get("/api/v1/status", headers=MONITOR).get_json()
    assert status["privacy"]["epsilon"] == 0.0 and status["strategy"]["aggregation"] == "dp_fedavg"
    for _ in range(2):
        run_round(client, fed, nodes)
    # 2 rounds, or 3 when a Poisson sample came out empty (probability 1/16 a round: that round is released at the
    # next tick, with noise alone) and run_round then finished the round after it too
    rounds = fed.model_version
    assert rounds in (2, 3)
    want = accountant_epsilon(0.5, 1.0, rounds, 1e-5)
    status = client.get("/api/v1/status", headers=MONITOR).get_json()
    assert status["privacy"] == {"noise_multiplier": 1.0, "clip_norm": 1.0, "sampling_rate": 0.5, "delta": 1e-5,
                                 "epsilon": want, "epsilon_budget": None, "rounds_allowed": 5}
    assert [r["epsilon"] for r in status["history"]] == [accountant_epsilon(0.5, 1.0, t, 1e-5)
                                                         for t in range(1, rounds + 1)]
    assert scrape(client)[("fl_privacy_epsilon", ())] == pytest.approx(want)
    buffer = io.StringIO()
    Console(file=buffer, width=160, height=30, no_color=True).print(text_monitor.render(status, height=30))
    assert f"ε {want:.2f} at δ 1e-05" in buffer.getvalue()


def test_the_run_stops_when_the_next_round_would_exceed_the_budget(make_app):
    budget = (accountant_epsilon(0.5, 1.0, 2, 1e-5) + accountant_epsilon(0.5, 1.0, 3, 1e-5)) / 2  # allows 2
    client, fed, nodes = dp_app(make_app, dp_epsilon_budget=budget)
    assert fed.rounds_to_run == 2
    for _ in range(2):
        run_round(client, fed, nodes)
    assert fed.phase == Phase.FINISHED and fed.model_version == 2
    status = client.get("/api/v1/status", headers=MONITOR).get_json()
    assert status["privacy"]["epsilon"] <= budget and status["privacy"]["rounds_allowed"] == 2


def test_a_budget_that_allows_no_round_refuses_to_start(make_app):
    with pytest.raises(StartRefused, match="allows no round: one round spends epsilon"):
        make_app(client_fraction=0.5, clip_norm=1.0, dp_noise_multiplier=1.0, dp_epsilon_budget=0.01)


def test_dp_with_a_task_strategy_that_does_not_apply_it_is_refused(tmp_path, make_app):
    task_file = tmp_path / "plain_strategy_task.py"
    task_file.write_text("from torch import nn\nfrom fedrest.aggregation import Strategy, make_combiner\n\n"
                         "def build_model():\n    return nn.Linear(3, 2)\n\n"
                         "def strategy(config, parameter_keys):\n"
                         "    return Strategy('mine', make_combiner('fedavg'))\n")
    with pytest.raises(TaskError, match="does not apply differential privacy"):
        make_app(task=str(task_file), client_fraction=0.5, clip_norm=1.0, dp_noise_multiplier=1.0)


def test_launch_waits_for_every_worker_under_dp():
    assert launch.launch_min_nodes(20, 0.25) == 5
    assert launch.launch_min_nodes(20, 0.25, private=True) == 20
    assert launch.launch_min_nodes(3, 1.0) == 3


def test_dp_needs_a_clip_norm_and_refuses_robust_rules_and_scaffold():
    with pytest.raises(ConfigError, match="needs --clip-norm > 0"):
        Config(dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="cannot use --aggregation median"):
        Config(dp_noise_multiplier=1.0, clip_norm=1.0, aggregation="median")
    with pytest.raises(ConfigError, match="cannot use --strategy scaffold"):
        Config(dp_noise_multiplier=1.0, clip_norm=1.0, strategy="scaffold")


def test_the_plot_monitor_titles_the_privacy_spent():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import monitor

    status = {"run_id": "r1", "state": "training", "round": 3, "total_rounds": 5, "nodes": [], "history": [],
              "privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0, "sampling_rate": 0.5, "delta": 1e-5,
                          "epsilon": 1.2345, "epsilon_budget": 8.0, "rounds_allowed": 4}}
    fig = plt.figure()
    monitor.draw(fig, status, monitor.NodeTimeline())
    assert "ε 1.23 at δ 1e-05 (budget 8, 4 rounds)" in fig._suptitle.get_text()
    plt.close(fig)


# ----------------------------------------------------------------------------- the coordinator's DP round


def key_sampling(count: int, of: int, q: float) -> bytes:
    """A secret key under which round 1's Poisson sample holds ``count`` of ``of`` clients (the count does not
    depend on the nodes' random ids, only on the key's draws)."""
    names = [f"n{i}" for i in range(of)]
    return next(key for key in (f"test-key-{i}".encode() for i in range(1000))
                if len(poisson_participants(names, q, key, 1, 1)) == count)


def dp_round_one(make_app, send):
    """Round 1 of a DP app (4 registered clients, q = 0.5, S = 1, z = 1) whose Poisson sample is 2 of the 4;
    ``send(i, reference)`` -> the state_dict the i-th participant uploads. Returns (fed, reference, uploaded,
    key) with ``uploaded`` the participants' state_dicts."""
    client, fed, nodes = dp_app(make_app)
    key = key_sampling(2, 4, 0.5)
    fed.privacy_key = key  # fixed, so that fewer clients take part than are registered (2 of N = 4)
    fed.tick()
    assert (fed.round, len(fed.state.participants)) == (1, 2)
    reference = OrderedDict((k, v.clone()) for k, v in fed.global_state.items())
    uploaded = []
    for node_id in fed.state.participants:
        node = next(n for n in nodes.values() if n["node_id"] == node_id)
        state = send(len(uploaded), reference)
        assert post_update(client, node, 1, state, {"num_samples": 50}).status_code == 202
        uploaded.append(state)
    fed.tick()
    assert fed.model_version == 1
    return fed, reference, uploaded, key


def test_a_dp_round_releases_the_clipped_sum_plus_the_seeded_noise_over_q_times_all_registered_clients(make_app):
    """McMahan et al. 2018, Algorithm 1, by hand: x + (sum of changes clipped to S + N(0, (zS)^2)) / (q N), with
    N = 4 registered clients although 2 took part, and the noise drawn from the round's secret seed."""
    fed, reference, uploaded, key = dp_round_one(
        make_app, lambda i, ref: filled_state_dict(0.01 * (i + 1), 7, ref))
    q, z, clip, num_clients = 0.5, 1.0, 1.0, 4
    floating = [k for k, v in reference.items() if v.is_floating_point()]
    total = {k: torch.zeros(reference[k].shape, dtype=torch.float64) for k in floating}
    for state in uploaded:
        change = {k: state[k].double() - reference[k].double() for k in floating}
        norm = math.sqrt(sum(float((d * d).sum()) for d in change.values()))
        assert norm > clip  # every change is clipped here
        for k in floating:
            total[k] += change[k] * (clip / norm)
    generator = torch.Generator().manual_seed(round_noise_seed(key, 1))
    for k in floating:  # one draw per coordinate, tensor after tensor in the state_dict's order
        expected = reference[k].double() + (total[k] + z * clip * torch.randn(
            reference[k].shape, generator=generator, dtype=torch.float64)) / (q * num_clients)
        if k.endswith("running_var"):
            expected = expected.clamp(min=0.0)
        assert torch.allclose(fed.global_state[k].double(), expected, rtol=0, atol=1e-6), k
    assert all(torch.equal(fed.global_state[k], reference[k]) for k in reference if k not in floating)


def test_a_dp_round_of_unchanged_models_moves_the_global_model_by_noise_of_std_z_s_over_q_n(make_app):
    """Independent of how the noise is drawn: on SimpleCNN's 1.2 M coordinates the released change of a round
    whose participants changed nothing has mean 0 and standard deviation z * S / (q * N) = 1 / (0.5 * 4)."""
    fed, reference, _, _ = dp_round_one(make_app, lambda i, ref: OrderedDict((k, v.clone()) for k, v in ref.items()))
    change = torch.cat([(fed.global_state[k].double() - reference[k].double()).reshape(-1) for k in reference
                        if reference[k].is_floating_point() and not k.endswith("running_var")])
    assert change.numel() > 1_000_000
    assert float(change.std()) == pytest.approx(1.0 / (0.5 * 4), rel=0.01)
    assert abs(float(change.mean())) < 0.005


@pytest.mark.parametrize("q, z, rounds, delta", [(0.0, 1.0, 1, 1e-5), (1.01, 1.0, 1, 1e-5), (-0.1, 1.0, 1, 1e-5),
                                                 (0.5, -0.1, 1, 1e-5), (0.5, 1.0, -1, 1e-5), (0.5, 1.0, 1, 0.0),
                                                 (0.5, 1.0, 1, 1.0)])
def test_epsilon_refuses_each_bad_parameter_alone(q, z, rounds, delta):
    with pytest.raises(ValueError, match=f"bad privacy parameters: q={q}, z={z}, rounds={rounds}, delta={delta}"):
        epsilon_spent(q, z, rounds, delta)


def test_epsilon_at_the_edges_of_its_parameters():
    assert epsilon_spent(1.0, 1.0, 3, 1e-5) == accountant_epsilon(1.0, 1.0, 3, 1e-5)  # q = 1: every client
    assert epsilon_spent(0.5, 0.0, 1, 1e-5) == math.inf  # no noise: no privacy
    assert epsilon_spent(0.5, 0.0, 0, 1e-5) == 0.0  # no round: nothing spent
    assert epsilon_spent(0.5, 1e-9, 0, 1e-5) == 0.0


def test_the_rounds_a_budget_allows_include_a_round_that_spends_it_exactly_and_stop_at_the_run_length():
    exact = epsilon_spent(0.25, 1.0, 7, 1e-5)
    assert rounds_within_budget(0.25, 1.0, 1e-5, exact, 1000) == 7
    assert rounds_within_budget(0.25, 1.0, 1e-5, math.nextafter(exact, 0.0), 1000) == 6
    assert rounds_within_budget(0.25, 1.0, 1e-5, exact, 5) == 5  # the run is shorter than the budget
    assert rounds_within_budget(0.25, 1.0, 1e-5, epsilon_spent(0.25, 1.0, 1, 1e-5) / 2, 1000) == 0
    assert rounds_within_budget(0.25, 1.0, 1e-5, 1e9, 1) == 1


def test_privacy_settings_of_a_config_and_what_the_status_shows():
    from fedrest.privacy import PrivacySettings

    assert PrivacySettings.of(Config()) is None  # DP off
    settings = PrivacySettings.of(Config(dp_noise_multiplier=1.0, clip_norm=2.0, client_fraction=0.25,
                                         dp_delta=1e-6, communication_rounds=9))
    assert settings == PrivacySettings(1.0, 2.0, 0.25, 1e-6, 0.0, 9)  # no budget: every round of the run
    assert settings.describe(3) == {"noise_multiplier": 1.0, "clip_norm": 2.0, "sampling_rate": 0.25,
                                    "delta": 1e-6, "epsilon": accountant_epsilon(0.25, 1.0, 3, 1e-6),
                                    "epsilon_budget": None, "rounds_allowed": 9}
    budget = epsilon_spent(0.25, 1.0, 4, 1e-6)
    capped = PrivacySettings.of(Config(dp_noise_multiplier=1.0, clip_norm=2.0, client_fraction=0.25,
                                       dp_delta=1e-6, communication_rounds=9, dp_epsilon_budget=budget))
    assert (capped.rounds_allowed, capped.describe(0)["epsilon_budget"], capped.epsilon(0)) == (4, budget, 0.0)


def test_the_round_noise_seed_is_the_documented_hmac():
    """HMAC-SHA256 of "dp-noise/<round>/<attempt>" under the key, its first 8 bytes big-endian, shifted to 63 bits."""
    import hashlib
    import hmac

    key = b"a secret key"
    digest = hmac.new(key, b"dp-noise/3/1", hashlib.sha256).digest()
    assert round_noise_seed(key, 3) == round_noise_seed(key, 3, 1) == int.from_bytes(digest[:8], "big") // 2
    assert round_noise_seed(key, 3, 2) != round_noise_seed(key, 3) != round_noise_seed(key, 4)
    assert 0 <= round_noise_seed(key, 3) < 2 ** 63


@pytest.mark.parametrize("clip, z, q, message", [
    (0.0, 1.0, 0.5, "differential privacy needs a clip norm > 0, got 0.0"),
    (1.0, -0.5, 0.5, "the noise multiplier must be >= 0, got -0.5"),
    (1.0, 1.0, 0.0, r"the sampling rate must be in \(0, 1\], got 0.0"),
    (1.0, 1.0, 1.5, r"the sampling rate must be in \(0, 1\], got 1.5"),
])
def test_the_private_mean_refuses_each_bad_setting(clip, z, q, message):
    with pytest.raises(ValueError, match=message):
        PrivateMean(clip, z, q)


def test_the_private_mean_sums_in_float64_takes_q_of_one_and_skips_an_update_that_does_not_fit():
    reference = OrderedDict(w=torch.zeros(1, dtype=torch.float64))
    mechanism = PrivateMean(clip_norm=1e9, noise_multiplier=0.0, sampling_rate=1.0)  # q = 1: the plain sum / N
    updates = [ClientUpdate.of("a", OrderedDict(w=torch.zeros(2)), 1),  # another shape: left out, named
               ClientUpdate.of("b", OrderedDict(w=torch.tensor([2.0 ** 24], dtype=torch.float64)), 1),
               ClientUpdate.of("c", OrderedDict(w=torch.tensor([1.0], dtype=torch.float64)), 1)]
    result = mechanism.combine(updates, reference, num_clients=1, noise_seed=0)
    assert result.used == ["b", "c"] and [key for key, _ in result.skipped] == ["a"]
    assert result.state_dict["w"].item() == 2.0 ** 24 + 1  # a float32 sum would lose the 1


def test_the_private_mean_clips_changes_shorter_than_one_and_counts_every_clipped_update():
    """Clipping to S = 0.5: changes of norm 0.8 and 0.6 (both under 1) are scaled to 0.5, 0.3 is kept."""
    reference = OrderedDict(w=torch.zeros(2, dtype=torch.float64))
    mechanism = PrivateMean(clip_norm=0.5, noise_multiplier=0.0, sampling_rate=1.0)
    updates = [ClientUpdate.of(k, OrderedDict(w=torch.tensor(v, dtype=torch.float64)), 1)
               for k, v in (("a", [0.8, 0.0]), ("b", [0.0, 0.6]), ("c", [0.3, 0.0]))]
    result = mechanism.combine(updates, reference, num_clients=2, noise_seed=0)
    assert result.clipped == 2
    assert result.state_dict["w"].tolist() == pytest.approx([(0.5 + 0.3) / 2, 0.5 / 2])
