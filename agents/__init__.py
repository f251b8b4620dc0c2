"""The example order-fulfilment saga: four agents choreographed over events.

    order.placed ─▶ inventory ─▶ inventory.reserved ─▶ payments ─▶ payment.captured ─▶ shipping
                        │                                 │                              │
                        ▼                                 ▼                              ▼
              inventory.rejected                   payment.failed              shipment.scheduled
                                                          │                    or shipping.failed
   compensations: payment.failed ─▶ inventory.released; shipping.failed ─▶ inventory.released
   + payment.refunded. orders ends each order once: order.completed or order.cancelled(reason).

Each agent is importable as ``agents.<name>:agent`` and keeps its state in SQLite.
"""
