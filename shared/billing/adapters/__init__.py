"""Adapters: the ports, satisfied by Postgres, SQS, Elasticsearch and the marketplaces."""
