"""The registry in-process: entry points, the kinds table, clashes, contracts, pluggy calling, events."""

from __future__ import annotations

import inspect
import types

import pytest
import torch

from kvbm_core import hookimpl, hookspecs
from kvbm_core.errors import PluginError
from kvbm_core.interfaces import EvictionPolicy, StorageTier, TierContext, TierLevel
from kvbm_core.layout import BlockLayout
from kvbm_core.lru import PriorityLruEviction
from kvbm_core.plugin_kinds import PLUGIN_KINDS, TYPE_HOOKS
from kvbm_core.registry import Registry, blocked_from_environment
from kvbm_core.settings import TierSpec
from kvbm_core.storage import BlockFileStorage, HostStorage, StagingLanes

FOUR_PLUGINS = {"kvbm-tier-cpu", "kvbm-tier-disk", "kvbm-tier-gds", "kvbm-policy-frequency"}


def plugin_module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        fn.__name__ = hook_name
        setattr(module, hook_name, fn if hasattr(fn, "kvbm_impl") else hookimpl(fn))
    return module


class RamTier(HostStorage):
    name = "ram"
    pinned = False

    def __init__(self, context: TierContext) -> None:
        super().__init__(context)
        self._slots = torch.zeros(context.num_slots, context.layout.bytes_per_block, dtype=torch.uint8)
        self.segment_slots = context.num_slots

    @property
    def slots(self) -> torch.Tensor:
        return self._slots

    def close(self) -> None:
        pass


class Fifo(EvictionPolicy):
    name = "fifo2"

    def __init__(self, num_slots, options=None):
        super().__init__(num_slots, options)
        self._order: dict[int, None] = {}

    def add(self, slot, priority, tick):
        self._order.setdefault(slot, None)

    def discard(self, slot):
        self._order.pop(slot, None)

    def victim(self):
        if not self._order:
            return None
        slot = next(iter(self._order))
        del self._order[slot]
        return slot

    def __len__(self):
        return len(self._order)


def context(num_slots: int = 3) -> TierContext:
    layout = BlockLayout(num_layers=2, kv_factor=2, elems_per_block=64, dtype="bfloat16", tokens_per_block=16)
    return TierContext(TierSpec(kind="ram", num_blocks=num_slots), layout, num_slots=num_slots, rank=0, world_size=1,
                       namespace=b"\0" * 16)


def test_entry_points_load_core_the_four_plugins_and_the_example():
    registry = Registry()
    distributions = {p.distribution for p in registry.plugins}
    assert distributions >= FOUR_PLUGINS | {"kvbm-core", "kvbm-example-fifo"}
    assert not registry.problems
    assert set(registry.types("tier")) >= {"cpu", "disk", "gds"}
    assert set(registry.types("eviction")) >= {"lru", "fifo"}
    assert set(registry.types("transport")) >= {"inproc", "etcd", "nats"}
    assert "frequency" in registry.types("filter")
    assert registry.types("eviction")["fifo"].distribution == "kvbm-example-fifo"
    core = registry.contributions("core")
    assert core["eviction"] == ["lru"] and core["transport"] == ["etcd", "inproc", "nats"]
    assert "kvbm_request_finished" in core["events"], "the metrics exporter subscribes through core"


def test_the_kinds_table_is_the_one_definition_of_plugin_kinds():
    type_hooks = {name for name, fn in vars(hookspecs).items()
                  if name.startswith("kvbm_") and inspect.signature(fn).parameters == {}}
    assert TYPE_HOOKS == type_hooks, "every hook without arguments contributes classes and has one row"
    assert len({k.name for k in PLUGIN_KINDS}) == len(PLUGIN_KINDS)
    for kind in PLUGIN_KINDS:
        assert getattr(hookspecs, kind.hook_name) is kind.hook
        assert kind.selected_as in inspect.getdoc(kind.hook), (kind.name, "the hook's docstring names its profile key")
    import kvbm_core.interfaces
    import kvbm_core.registry
    assert not hasattr(kvbm_core.interfaces, "PLUGIN_BASES") and not hasattr(kvbm_core.registry, "_TYPE_HOOKS")


def test_type_name_claimed_twice_names_both_distributions():
    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("a", kvbm_tier_types=lambda: [RamTier]), "a", "kvbm-ram-a", "1")
    registry.register(plugin_module("b", kvbm_tier_types=lambda: [RamTier]), "b", "kvbm-ram-b", "1")
    with pytest.raises(PluginError) as info:
        registry.types("tier")
    assert "kvbm-ram-a" in str(info.value) and "kvbm-ram-b" in str(info.value)
    assert "DYN_KVBM_DISABLE_PLUGINS" in str(info.value)
    assert [p.status for p in registry.plugins] == ["ok", "broken"]


def test_wrong_type_names_the_distribution():
    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("bad", kvbm_eviction_policies=lambda: [RamTier]), "bad", "kvbm-bad", "1")
    with pytest.raises(PluginError, match="kvbm-bad.*not a subclass of EvictionPolicy"):
        registry.types("eviction")


def test_type_without_name_and_raising_hook_are_errors():
    class Nameless(EvictionPolicy):
        def add(self, slot, priority, tick): ...
        def discard(self, slot): ...
        def victim(self): ...
        def __len__(self): return 0

    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("n", kvbm_eviction_policies=lambda: [Nameless]), "n", "kvbm-nameless", "1")
    with pytest.raises(PluginError, match="kvbm-nameless.*no string 'name'"):
        registry.types("eviction")

    def boom():
        raise RuntimeError("broken")

    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("r", kvbm_transports=boom), "r", "kvbm-raises", "1")
    with pytest.raises(PluginError, match="kvbm-raises.*broken"):
        registry.types("transport")


def test_policy_with_an_unimplemented_member_is_refused_when_it_registers():
    class Partial(EvictionPolicy):
        name = "partial"

        def add(self, slot, priority, tick): ...
        def discard(self, slot): ...

    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("p", kvbm_eviction_policies=lambda: [Partial]), "p", "kvbm-partial", "1")
    with pytest.raises(PluginError, match=r"kvbm-partial.*eviction 'partial' \(.*Partial\) does not implement __len__, victim"):
        registry.types("eviction")


def test_misspelt_hook_is_an_error_naming_the_distribution():
    registry = Registry(load_entry_points=False)
    with pytest.raises(PluginError, match="kvbm-typo.*kvbm_tier_type"):
        registry.register(plugin_module("typo", kvbm_tier_type=lambda: [RamTier]), "typo", "kvbm-typo", "1")
    assert registry.pm.get_plugin("typo") is None


def test_hook_with_wrong_arguments_is_refused_at_registration():
    def stored(tier, rout):  # "rout" is not an argument of kvbm_blocks_stored
        pass

    registry = Registry(load_entry_points=False)
    with pytest.raises(PluginError, match="kvbm-wrong-args"):
        registry.register(plugin_module("w", kvbm_blocks_stored=stored), "w", "kvbm-wrong-args", "1")


def test_blocked_plugins_are_listed_disabled_and_contribute_nothing():
    assert blocked_from_environment({"DYN_KVBM_DISABLE_PLUGINS": " tier_gds, example_fifo ,"}) == {"tier_gds", "example_fifo"}
    registry = Registry(blocked={"tier_gds", "example_fifo"})
    infos = {p.name: p for p in registry.plugins}
    assert infos["tier_gds"].enabled is False and infos["tier_gds"].distribution == "kvbm-tier-gds"
    assert infos["tier_gds"].status == "blocked"
    assert "gds" not in registry.types("tier") and "fifo" not in registry.types("eviction")
    assert infos["tier_cpu"].enabled is True


def test_a_broken_plugin_is_listed_with_its_problem_and_the_others_still_load():
    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("good", kvbm_tier_types=lambda: [RamTier]), "good", "kvbm-good", "1")
    registry.register(plugin_module("bad", kvbm_eviction_policies=lambda: [dict]), "bad", "kvbm-bad", "1")
    infos = {p.name: p for p in registry.plugins}
    assert infos["good"].status == "ok" and registry.contributions("good") == {"tier": ["ram"]}
    assert infos["bad"].status == "broken" and "not a subclass of EvictionPolicy" in infos["bad"].problem
    assert registry.pm.get_plugin("bad") is None, "a broken plugin runs no hook"
    assert [str(p) for p in registry.problems] == [f"plugin distribution 'kvbm-bad': {infos['bad'].problem}"]


# ------------------------------------------------------------------------- pluggy calling
def test_type_collection_runs_hook_wrappers():
    """A wrapper on a type hook sees (and may edit) each plugin's contribution: here it hides one."""
    seen = []

    @hookimpl(wrapper=True)
    def kvbm_eviction_policies():
        classes = yield
        seen.append([c.name for result in classes for c in result])
        return [[c for c in result if c.name != "fifo2"] for result in classes]

    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("policies", kvbm_eviction_policies=lambda: [PriorityLruEviction, Fifo]),
                      "policies", "kvbm-policies", "1")
    registry.register(plugin_module("wrapper", kvbm_eviction_policies=kvbm_eviction_policies), "wrapper", "kvbm-wrapper", "1")
    assert set(registry.types("eviction")) == {"lru"}
    assert seen == [["lru", "fifo2"]]


def test_events_go_through_pluggy_wrappers_ordering_and_tracing():
    calls = []

    @hookimpl(wrapper=True)
    def wrap(route, num_blocks, num_bytes, seconds):
        calls.append("wrapper before")
        result = yield
        calls.append("wrapper after")
        return result

    @hookimpl(tryfirst=True)
    def first(route, num_blocks, num_bytes, seconds):
        calls.append("first")

    def plain(route, num_blocks, num_bytes, seconds):
        calls.append("plain")

    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("first", kvbm_blocks_offloaded=first), "first", "kvbm-first", "1")
    registry.register(plugin_module("plain", kvbm_blocks_offloaded=plain), "plain", "kvbm-plain", "1")
    registry.register(plugin_module("wrap", kvbm_blocks_offloaded=wrap), "wrap", "kvbm-wrap", "1")
    traced = []
    undo = registry.pm.add_hookcall_monitoring(lambda name, impls, kwargs: traced.append(name), lambda *a: None)
    registry.notify("kvbm_blocks_offloaded", route="d2h", num_blocks=1, num_bytes=2, seconds=0.1)
    undo()
    assert calls == ["wrapper before", "first", "plain", "wrapper after"]
    assert traced == ["kvbm_blocks_offloaded"]


def test_notify_calls_every_subscriber_even_after_one_fails(log_capture):
    seen = []

    def failing(route, num_blocks, num_bytes, seconds):
        raise RuntimeError("subscriber bug")

    def recording(route, num_blocks, num_bytes, seconds):
        seen.append((route, num_blocks, num_bytes, seconds))

    outcomes = []

    @hookimpl(wrapper=True)
    def watching(route, num_blocks, num_bytes, seconds):
        outcomes.append((yield))

    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("g", kvbm_blocks_offloaded=recording), "g", "kvbm-g", "1")
    registry.register(plugin_module("f", kvbm_blocks_offloaded=failing), "f", "kvbm-f", "1")
    registry.register(plugin_module("w", kvbm_blocks_offloaded=watching), "w", "kvbm-w", "1")
    registry.notify("kvbm_blocks_offloaded", route="d2h", num_blocks=2, num_bytes=64, seconds=0.5)
    assert seen == [("d2h", 2, 64, 0.5)], "pluggy calls f first (registered last); g still runs"
    assert outcomes == [[]], "the wrapper saw the call complete"
    failure = next(line for line in log_capture.getvalue().splitlines() if "event hook failed" in line)
    assert "plugin=f" in failure and "distribution=kvbm-f" in failure and "hook=kvbm_blocks_offloaded" in failure
    with pytest.raises(TypeError, match="num_bytes"):
        registry.notify("kvbm_blocks_offloaded", route="d2h", num_blocks=2, seconds=0.5)


# ---------------------------------------------------------------------- tier contracts
class BareTier(StorageTier):
    """Written against StorageTier alone: the engine cannot copy through it."""

    name = "bare"
    level = TierLevel.HOST

    def close(self) -> None:
        pass


class NoSlots(HostStorage):
    name = "noslots"

    def close(self) -> None:
        pass


class DeepTier(RamTier):
    name = "deep"
    level = 7  # type: ignore[assignment]


class Shrinking(RamTier):
    name = "shrinking"

    @classmethod
    def bytes_per_slot(cls, layout):
        return layout.bytes_per_block // 2


@pytest.mark.parametrize("cls, problem", [
    (BareTier, "tier 'bare' (BareTier) is a HOST tier but does not subclass HostStorage, "
               "whose members it must provide: close, slots, context, pinned, segment_slots"),
    (NoSlots, "tier 'noslots' (NoSlots) does not implement HostStorage member(s): slots"),
    (DeepTier, "tier 'deep' (DeepTier) has level 7; accepted: 2 (HOST), 3 (DISK)"),
    (Shrinking, "tier 'shrinking' (Shrinking) bytes_per_slot(layout) returned 16384 for a block of 32768 bytes"),
])
def test_tier_is_checked_against_its_levels_contract_when_it_registers(cls, problem):
    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("t", kvbm_tier_types=lambda: [cls]), "t", "kvbm-t", "1")
    (error,) = registry.problems
    assert error.distribution == "kvbm-t" and str(error).startswith(f"plugin distribution 'kvbm-t': {problem}")
    assert "\n" not in str(error)
    with pytest.raises(PluginError, match="kvbm-t"):
        registry.types("tier")


class Unattached(RamTier):
    """Sets up its pool but forgets the segment size the engine splits copies at."""

    name = "unattached"

    def __init__(self, context):
        super().__init__(context)
        del self.segment_slots


class WrongShape(RamTier):
    name = "wrongshape"

    @property
    def slots(self):
        return torch.zeros(self.context.num_slots, 8, dtype=torch.uint8)


class Exploding(RamTier):
    name = "exploding"

    def __init__(self, context):
        raise MemoryError("no pool for you")


@pytest.mark.parametrize("cls, problem", [
    (Unattached, "tier 'unattached' (Unattached) breaks its contract once built: has no attribute 'segment_slots'"),
    (WrongShape, "tier 'wrongshape' (WrongShape) breaks its contract once built: slots must be a uint8 tensor of shape (3, 512)"),
    (Exploding, "tier 'exploding' (Exploding) failed to start: MemoryError('no pool for you')"),
])
def test_tier_that_misbehaves_when_built_is_an_error_naming_its_distribution(cls, problem):
    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("t", kvbm_tier_types=lambda: [cls]), "t", "kvbm-t", "1")
    with pytest.raises(PluginError) as info:
        registry.create("tier", cls.name, f"tiers.{cls.name}.kind", context())
    assert info.value.distribution == "kvbm-t" and info.value.reason.startswith(problem)


def test_a_conforming_tier_is_built_and_closed():
    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("t", kvbm_tier_types=lambda: [RamTier]), "t", "kvbm-t", "1")
    tier = registry.create("tier", "ram", "tiers.ram.kind", context())
    assert tuple(tier.slots.shape) == (3, 512)
    registry.close(tier)


def test_a_tier_whose_close_raises_is_logged_and_the_next_still_closes(log_capture):
    closed = []

    class Leaky(RamTier):
        name = "leaky"

        def close(self):
            raise OSError("cannot unmap")

    class Tidy(RamTier):
        name = "tidy"

        def close(self):
            closed.append(self.name)

    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("t", kvbm_tier_types=lambda: [Leaky, Tidy]), "t", "kvbm-leaky", "1")
    tiers = [registry.create("tier", name, "tiers", context()) for name in ("leaky", "tidy")]
    for tier in tiers:
        registry.close(tier)
    assert closed == ["tidy"]
    (line,) = [line for line in log_capture.getvalue().splitlines() if "close() failed" in line]
    assert "distribution=kvbm-leaky" in line and "OSError('cannot unmap')" in line


class RecordTier(BlockFileStorage):
    """A file-backed tier's members, without a file: enough for its contract to be checked."""

    name = "records"

    @classmethod
    def bytes_per_slot(cls, layout):
        return layout.bytes_per_block + 4096

    def __init__(self, context: TierContext) -> None:
        super().__init__(context)
        self.record_bytes = self.bytes_per_slot(context.layout)
        self.io_records, self.io_threads = 4, 1
        self.lanes = StagingLanes(2, self.io_records, self.record_bytes, device=None)

    def recovered(self): ...
    def data_view(self, lane, count): ...
    def write_lane(self, lane, first_slot, keys): ...
    def write_rows(self, rows, first_slot, keys, lane): ...
    def read_lane(self, lane, first_slot, keys): ...

    def close(self) -> None:
        self.lanes.close()


class Unreadable(BlockFileStorage):
    """Writes records but cannot read them back."""

    name = "unreadable"

    def recovered(self): ...
    def data_view(self, lane, count): ...
    def write_lane(self, lane, first_slot, keys): ...
    def write_rows(self, rows, first_slot, keys, lane): ...
    def close(self): ...


class HeaderlessSizing(RecordTier):
    """Writes records with a header but sizes slots as bare blocks: the file would outgrow its capacity."""

    name = "headerless"

    @classmethod
    def bytes_per_slot(cls, layout):
        return layout.bytes_per_block

    def __init__(self, context):
        super().__init__(context)
        self.record_bytes = context.layout.bytes_per_block + 4096


def test_disk_tier_is_checked_against_block_file_storage():
    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("t", kvbm_tier_types=lambda: [RecordTier, HeaderlessSizing]), "t", "kvbm-t", "1")
    tier = registry.create("tier", "records", "tiers.records.kind", context())
    assert tier.record_bytes == 512 + 4096
    registry.close(tier)
    with pytest.raises(PluginError) as info:
        registry.create("tier", "headerless", "tiers.headerless.kind", context())
    assert info.value.distribution == "kvbm-t"
    assert info.value.reason.startswith("tier 'headerless' (HeaderlessSizing) breaks its contract once built: "
                                        "record_bytes 4608 differs from bytes_per_slot(layout) 512")

    registry = Registry(load_entry_points=False)
    registry.register(plugin_module("u", kvbm_tier_types=lambda: [Unreadable]), "u", "kvbm-u", "1")
    (error,) = registry.problems
    assert error.reason == "tier 'unreadable' (Unreadable) does not implement BlockFileStorage member(s): read_lane"
