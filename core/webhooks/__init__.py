"""Webhooks (issue 14, in progress): signing per the Standard Webhooks spec and the
guard that decides which addresses a delivery may connect to. Endpoints, the
outbox and delivery come next; nothing sends webhooks yet."""
