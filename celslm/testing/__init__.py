"""What tests and benchmarks start on loopback: processes (`processes`), Redis and Redis Clusters
(`redis_local`), servers that misbehave as told (`faults`), and two network namespaces joined by a
shaped veth pair (`netns`). Nothing here is part of the product's behaviour; it ships so that the
benchmarks can use it from an installed wheel.
"""
