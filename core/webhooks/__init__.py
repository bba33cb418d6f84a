"""Webhooks (issue 14, in progress): signing per the Standard Webhooks spec, the
guard that decides which addresses a delivery may connect to, and the retry
schedule. Endpoints, the outbox and delivery come next; nothing sends webhooks yet."""
