# Empties directory DIR (cmake -DDIR=... -P fresh_dir.cmake): the fixture of
# tests whose jobs share files across mpirun invocations.
file(REMOVE_RECURSE "${DIR}")
file(MAKE_DIRECTORY "${DIR}")
