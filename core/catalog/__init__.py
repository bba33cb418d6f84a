"""The product catalog: a polite async crawler, site entries as data, image padding,
persistence in Postgres and the dataset export. Knows nothing of HTTP APIs or arq."""
