# Sourced by scripts/test and bench/run: make sure a local PostgreSQL server runs and
# has a role that may create databases; sets QNA_TEST_DATABASE_URL.

ensure_postgres() {
    local role=qna_test password=qna_test port
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || [[ -z "$(ls /etc/postgresql 2>/dev/null)" ]]; then
        echo "== installing PostgreSQL"
        if [[ $(id -u) -ne 0 ]]; then
            echo "PostgreSQL is not installed; run as root or install it (apt-get install postgresql)." >&2
            return 1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main"' | grep -q .; then
        pg_createcluster "$version" main >/dev/null
    fi
    if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" && $4 == "online"' | grep -q .; then
        pg_ctlcluster "$version" main start
    fi
    port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')
    for _ in $(seq 1 30); do
        pg_isready -q -h 127.0.0.1 -p "$port" && break
        sleep 1
    done
    local run_psql=(psql -v ON_ERROR_STOP=1 -q -p "$port")
    if [[ $(id -u) -eq 0 ]]; then
        run_psql=(runuser -u postgres -- "${run_psql[@]}")
    fi
    "${run_psql[@]}" -tc "SELECT 1 FROM pg_roles WHERE rolname = '$role'" | grep -q 1 \
        || "${run_psql[@]}" -c "CREATE ROLE $role LOGIN CREATEDB PASSWORD '$password'"
    QNA_TEST_DATABASE_URL="postgresql://$role:$password@127.0.0.1:$port/postgres"
}
