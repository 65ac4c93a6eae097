"""``CachesvcConnector``: the class vLLM instantiates (once per role and process); it
builds the role's side (scheduler.SchedulerSide or worker.WorkerSide) and dispatches
vLLM's hooks to it. See the package docstring for the configuration."""

from __future__ import annotations

import os

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from cachesvc_client import CacheClient, ClientOptions
from cachesvc_connectors.vllm.identity import ConnectorConfig, engine_identity
from cachesvc_connectors.vllm.meta import CachesvcMetadata
from cachesvc_connectors.vllm.scheduler import SchedulerSide
from cachesvc_connectors.vllm.worker import WorkerSide

if TYPE_CHECKING:
    import torch


class CachesvcConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.config = ConnectorConfig.from_extra(dict(self._kv_transfer_config.kv_connector_extra_config))
        tenant = {"tenant": self.config.tenant} if self.config.tenant else {}
        # The token comes from the environment only: vLLM logs kv_connector_extra_config.
        self.client = CacheClient(self.config.address,
                                  options=ClientOptions(**tenant, token=os.environ.get("CACHESVC_TOKEN", "")))
        identity = engine_identity(vllm_config, self.config)
        block_size = vllm_config.cache_config.block_size
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_side: SchedulerSide | None = SchedulerSide(self.client, identity, self.config, block_size)
            self.worker_side: WorkerSide | None = None
        else:
            self.scheduler_side = None
            self.worker_side = WorkerSide(self.client, identity, self.config, block_size)

    # ------------------------------------------------------------ scheduler

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler_side is not None
        return self.scheduler_side.matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        assert self.scheduler_side is not None
        self.scheduler_side.after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> CachesvcMetadata:
        assert self.scheduler_side is not None
        return self.scheduler_side.build_meta(scheduler_output)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.scheduler_side is not None:
            self.scheduler_side.finished(request)
        return False, None

    # ------------------------------------------------------------ worker

    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        assert self.worker_side is not None
        self.worker_side.register(kv_caches)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        assert self.worker_side is not None
        self.worker_side.start_load(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        assert self.worker_side is not None
        self.worker_side.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata, **kwargs: Any) -> None:
        assert self.worker_side is not None
        self.worker_side.save_layer(self._meta(), layer_name, kv_layer)

    def wait_for_save(self) -> None:
        assert self.worker_side is not None
        self.worker_side.finish_step()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.failed_blocks() if self.worker_side is not None else set()

    def shutdown(self) -> None:
        self.client.close()

    def _meta(self) -> CachesvcMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, CachesvcMetadata)
        return meta
