"""When a step's stores are issued: in ``get_finished``, after the engine queued its read of the
sampled tokens, never at the end of the forward pass, where the device -> host copies would be
queued ahead of that read; and from the next ``bind_connector_meta`` when no poll came between."""

from __future__ import annotations

from typing import Any

from engine_runs import conversations, executor_config

from kvbm_core.trtllm.connector import KvbmConnectorLeader, KvbmConnectorWorker

CPU = [{"kind": "cpu", "num_blocks": 256}]


class StoreCallSites(KvbmConnectorWorker):
    """Records, for every ``start_stores`` of the engine, the connector call it came from."""

    sites: list[str] = []

    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        self._site = "none"

    def _setup(self, config: Any) -> None:
        super()._setup(config)
        start_stores = self._engine.start_stores

        def recorded(ops: Any, after: Any) -> None:
            type(self).sites.append(self._site)
            start_stores(ops, after)

        self._engine.start_stores = recorded

    def _in(self, site: str, call: Any, *args: Any) -> Any:
        self._site = site
        try:
            return call(*args)
        finally:
            self._site = "none"

    def _on_forward_pass_done(self) -> None:
        self._in("forward-pass callable", super()._on_forward_pass_done)

    def wait_for_save(self, stream: Any) -> None:
        self._in("wait_for_save", super().wait_for_save, stream)

    def bind_connector_meta(self, metadata: object) -> None:
        self._in("bind_connector_meta", super().bind_connector_meta, metadata)

    def get_finished(self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]) -> Any:
        return self._in("get_finished", super().get_finished, finished_gen_req_ids, started_loading_req_ids)


class SkipsEveryOtherPoll(StoreCallSites):
    """As if every other poll came before the step's stores could be issued."""

    sites: list[str] = []
    polls = 0

    def get_finished(self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]) -> Any:
        type(self).polls += 1
        return super().get_finished(finished_gen_req_ids, started_loading_req_ids)

    def _start_stores(self) -> None:
        if self._site == "get_finished" and type(self).polls % 2:
            return
        super()._start_stores()


def test_stores_are_issued_after_the_sample_read_not_at_forward_end(kvbm_run):
    StoreCallSites.sites = []
    result = kvbm_run(conversations(), CPU, connector=(KvbmConnectorLeader, StoreCallSites))
    result.assert_same_tokens()
    assert result.stats.offload_blocks_d2h > 0 and result.stats.failed_ops == 0
    assert StoreCallSites.sites and set(StoreCallSites.sites) == {"get_finished"}


def test_stores_a_poll_did_not_issue_go_out_with_the_next_step(kvbm_run):
    plain = kvbm_run(conversations(), CPU)
    SkipsEveryOtherPoll.sites, SkipsEveryOtherPoll.polls = [], 0
    result = kvbm_run(conversations(), CPU, connector=(KvbmConnectorLeader, SkipsEveryOtherPoll),
                      baseline=plain.baseline, model=plain.executor.model, config=executor_config())
    result.assert_same_tokens()
    assert "bind_connector_meta" in SkipsEveryOtherPoll.sites
    assert result.stats.failed_ops == 0
    assert result.stats.offload_blocks_d2h == plain.stats.offload_blocks_d2h
