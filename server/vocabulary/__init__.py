"""The nouns every layer shares, as plain Python (never torch): the text decoder's configuration,
subnets and the subnet table, sampling parameters, and one sequence's share of a step."""
