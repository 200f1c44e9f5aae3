"""``make bench``: the runner's overhead, throughput and memory as ratios.

Every figure is a ratio against a baseline measured in the same run (bare
spawns of /bin/true from a plain Python process, a bare pipe, the output
actually held), because absolute times drift from machine to machine and from
minute to minute. Run it with ``python -m bench``; see the README.
"""

__all__: list[str] = []
