"""The reliability runs (loadtests/reliability.py is their command line): a load generator and one
module per run (throughput knee and soak, Redis outage, stream disconnects, locust figures)."""
