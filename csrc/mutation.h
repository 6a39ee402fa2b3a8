// Deliberately injected bugs for the mutation check (scripts/mutate.py).
//
// A real build never defines REID_MUTATION, so every REID_MUTANT(k) is the constant
// false and the compiler drops the injected code.  `python scripts/mutate.py` builds
// the extension with -DREID_MUTATION=k into a separate directory and runs the tests
// against it: each mutant must make at least one test fail.  The list of mutants and
// what each one breaks is in scripts/mutate.py.
#pragma once

#ifndef REID_MUTATION
#define REID_MUTATION 0
#endif

#define REID_MUTANT(k) (REID_MUTATION == (k))
