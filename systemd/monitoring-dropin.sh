#!/bin/sh
# Prints the monitoring drop-in `make install-systemd` installs next to a unit:
#   monitoring-dropin.sh UNIT METRICS_DIR NETWORK_ALLOW
# METRICS_DIR: node_exporter's textfile folder (the service user must be able to write
# there); NETWORK_ALLOW: the addresses pings and messages may reach (the endpoints, and
# the DNS resolver when the URLs have host names). Either may be empty. Only the backup
# unit pings, so only it gets the network.
set -eu
unit=$1 metrics_dir=$2 network_allow=$3
echo "# Rendered by make install-systemd: monitoring (see README, Monitoring)."
echo "[Service]"
if [ -n "$metrics_dir" ]; then
	echo "# The metrics file, written atomically: a temp file in the same folder, then a rename."
	echo "ReadWritePaths=-$metrics_dir"
	echo "Environment=METRICS_FILE=$metrics_dir/ai_stack_backup.prom"
fi
if [ -n "$network_allow" ] && [ "$unit" = ai_stack_backup.service ]; then
	echo "# HEALTHCHECK_URL and NOTIFY_URL need IP; IPAddressDeny=any still holds for the rest."
	echo "PrivateNetwork=no"
	echo "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"
	echo "IPAddressAllow=$network_allow"
fi
