"""The mini world's training stages, one function per stage over a ``BuildState``: each trains
(or writes) its part of the build, resumably, and returns whether it finished."""
