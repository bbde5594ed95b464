# bench/cpu.sh: the CPU time processes have used, from /proc; sourced by
# servers.sh (run.sh, idle.sh, tls.sh) and ab.sh.
# shellcheck shell=bash

# cpu_ticks PID...: sets CPU_USER and CPU_SYSTEM to the user and system time
# the PIDs have used so far, in clock ticks (CLK_TCK a second); no subshell.
cpu_ticks() {
    local pid stat
    local -a fields
    CPU_USER=0
    CPU_SYSTEM=0
    for pid in "$@"; do
        read -r stat 2>/dev/null <"/proc/$pid/stat" || continue
        read -r -a fields <<<"${stat##*) }" # from the third field, state
        CPU_USER=$((CPU_USER + fields[11]))
        CPU_SYSTEM=$((CPU_SYSTEM + fields[12]))
    done
}
# shellcheck disable=SC2034 # read by the scripts that source this one
CLK_TCK=$(getconf CLK_TCK)
