"""ksbpf verify: prove the kill switch on this machine -- the policy model, the
differential fuzzer that proves model and kernel agree, the zero-traffic check
of every protected scope, the ways around it, and the leak matrix lab."""
