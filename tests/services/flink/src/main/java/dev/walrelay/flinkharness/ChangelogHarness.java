package dev.walrelay.flinkharness;

import java.io.IOException;
import java.io.UncheckedIOException;
import java.math.BigDecimal;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Instant;
import java.time.LocalDate;
import java.time.LocalDateTime;
import java.time.LocalTime;
import java.time.ZoneOffset;
import java.time.format.DateTimeFormatter;
import java.util.ArrayList;
import java.util.Base64;
import java.util.Comparator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.TimeUnit;
import java.util.stream.Stream;

import org.apache.flink.configuration.Configuration;
import org.apache.flink.configuration.CoreOptions;
import org.apache.flink.configuration.RestartStrategyOptions;
import org.apache.flink.configuration.WebOptions;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.table.api.EnvironmentSettings;
import org.apache.flink.table.api.TableResult;
import org.apache.flink.table.api.bridge.java.StreamTableEnvironment;
import org.apache.flink.table.catalog.Column;
import org.apache.flink.table.catalog.ResolvedSchema;
import org.apache.flink.table.types.logical.LocalZonedTimestampType;
import org.apache.flink.table.types.logical.LogicalType;
import org.apache.flink.table.types.logical.TimestampType;
import org.apache.flink.types.Row;
import org.apache.flink.types.RowKind;
import org.apache.flink.util.CloseableIterator;

/**
 * Reads one Kafka topic of Debezium-shaped change events with Flink SQL (a
 * local mini-cluster in this JVM), applies the changelog rows (+I, -U, +U,
 * -D) to a map keyed by the primary key, and prints the final table as JSON
 * lines sorted by key, then {"rows":N}.
 *
 * <p>Exit codes: 0 done, 1 Flink (or any other) error, 2 bad arguments, 3
 * timeout.
 */
public final class ChangelogHarness {

    private static final String USAGE =
            "usage: --bootstrap HOST:PORT --topic T --format debezium-json|debezium-avro-confluent\n"
                    + "       [--registry-url URL] --columns 'id BIGINT, name STRING, ...'\n"
                    + "       --primary-key COL[,COL...] [--timeout-seconds N] [--parallelism N]\n"
                    + "       [--option key=value]...";

    private static final class Args {
        String bootstrap;
        String topic;
        String format;
        String registryUrl;
        String columns;
        List<String> primaryKey = new ArrayList<>();
        long timeoutSeconds = 120;
        int parallelism = 1;
        Map<String, String> extraOptions = new LinkedHashMap<>();
    }

    private static final class UsageError extends Exception {
        UsageError(String message) {
            super(message);
        }
    }

    public static void main(String[] argv) {
        Args args;
        try {
            args = parse(argv);
        } catch (UsageError e) {
            System.err.println("flink harness: " + e.getMessage());
            System.err.println(USAGE);
            System.exit(2);
            return;
        }
        int code;
        Path tmp = null;
        try {
            // Flink's scratch files (its RPC jar unpacked on every start, the
            // blob cache, spill folders) go here and are removed at exit:
            // the JVM ends with halt(), which skips Flink's own clean-up.
            tmp = Files.createTempDirectory("walrelay-flink-harness-");
            TMP_DIR = tmp;
            startWatchdog(args.timeoutSeconds);
            run(args, tmp);
            code = 0;
        } catch (Throwable t) {
            // Flink wraps the reason (a parse error, an unreachable
            // registry, ...) several levels deep: the chain of messages
            // first, innermost last, then the full stack trace.
            System.err.println("flink harness: FAILED: " + t);
            for (Throwable c = t.getCause(); c != null && c != c.getCause(); c = c.getCause()) {
                System.err.println("flink harness:   caused by: " + c);
            }
            t.printStackTrace(System.err);
            code = 1;
        }
        halt(code);
    }

    private static volatile Path TMP_DIR;

    /** Flushes, removes the scratch folder, and ends the JVM at once. */
    private static void halt(int code) {
        System.out.flush();
        System.err.flush();
        Path tmp = TMP_DIR;
        if (tmp != null) {
            try (Stream<Path> paths = Files.walk(tmp)) {
                paths.sorted(Comparator.reverseOrder()).forEach(p -> p.toFile().delete());
            } catch (IOException | UncheckedIOException e) {
                System.err.println("flink harness: could not remove " + tmp + ": " + e);
            }
        }
        // Flink's and Kafka's non-daemon threads must not keep the JVM alive.
        Runtime.getRuntime().halt(code);
    }

    private static Args parse(String[] argv) throws UsageError {
        Args a = new Args();
        for (int i = 0; i < argv.length; i++) {
            String flag = argv[i];
            if (i + 1 >= argv.length) {
                throw new UsageError(flag + " needs a value");
            }
            String v = argv[++i];
            switch (flag) {
                case "--bootstrap" -> a.bootstrap = v;
                case "--topic" -> a.topic = v;
                case "--format" -> a.format = v;
                case "--registry-url" -> a.registryUrl = v;
                case "--columns" -> a.columns = v;
                case "--primary-key" -> {
                    for (String k : v.split(",")) {
                        if (!k.isBlank()) {
                            a.primaryKey.add(k.trim());
                        }
                    }
                }
                case "--timeout-seconds" -> a.timeoutSeconds = parseLong(flag, v);
                case "--parallelism" -> a.parallelism = (int) parseLong(flag, v);
                case "--option" -> {
                    int eq = v.indexOf('=');
                    if (eq <= 0) {
                        throw new UsageError("--option takes key=value, got: " + v);
                    }
                    a.extraOptions.put(v.substring(0, eq), v.substring(eq + 1));
                }
                default -> throw new UsageError("unknown argument: " + flag);
            }
        }
        if (a.bootstrap == null || a.topic == null || a.format == null || a.columns == null
                || a.primaryKey.isEmpty()) {
            throw new UsageError("--bootstrap, --topic, --format, --columns and --primary-key are required");
        }
        switch (a.format) {
            case "debezium-json" -> {}
            case "debezium-avro-confluent" -> {
                if (a.registryUrl == null) {
                    throw new UsageError("--format debezium-avro-confluent needs --registry-url");
                }
            }
            default -> throw new UsageError("--format: debezium-json or debezium-avro-confluent, got: " + a.format);
        }
        if (a.timeoutSeconds <= 0 || a.parallelism <= 0) {
            throw new UsageError("--timeout-seconds and --parallelism must be positive");
        }
        return a;
    }

    private static long parseLong(String flag, String v) throws UsageError {
        try {
            return Long.parseLong(v);
        } catch (NumberFormatException e) {
            throw new UsageError(flag + ": not a number: " + v);
        }
    }

    private static void startWatchdog(long seconds) {
        Thread t = new Thread(() -> {
            try {
                TimeUnit.SECONDS.sleep(seconds);
            } catch (InterruptedException e) {
                return;
            }
            System.err.println("flink harness: FAILED: timeout: the job did not finish within "
                    + seconds + " s (--timeout-seconds)");
            halt(3);
        }, "harness-watchdog");
        t.setDaemon(true);
        t.start();
    }

    // ------------------------------------------------------------------ job

    private static void run(Args a, Path tmp) throws Exception {
        Configuration conf = new Configuration();
        conf.set(CoreOptions.TMP_DIRS, tmp.toString());
        conf.set(WebOptions.TMP_DIR, tmp.toString());
        // A failed record fails the job at once (no restarts, no retries).
        conf.set(RestartStrategyOptions.RESTART_STRATEGY, "none");
        conf.set(CoreOptions.DEFAULT_PARALLELISM, a.parallelism);
        StreamExecutionEnvironment env =
                StreamExecutionEnvironment.createLocalEnvironment(a.parallelism, conf);
        StreamTableEnvironment tEnv =
                StreamTableEnvironment.create(env, EnvironmentSettings.inStreamingMode());

        Map<String, String> opts = new LinkedHashMap<>();
        opts.put("connector", "kafka");
        opts.put("topic", a.topic);
        opts.put("properties.bootstrap.servers", a.bootstrap);
        opts.put("properties.group.id", "walrelay-flink-harness");
        opts.put("properties.isolation.level", "read_committed");
        opts.put("scan.startup.mode", "earliest-offset");
        // Bounded: the job ends at the offsets that were the latest when it
        // started.
        opts.put("scan.bounded.mode", "latest-offset");
        opts.put("format", a.format);
        if (a.format.equals("debezium-json")) {
            // Say it explicitly: a record Flink cannot read fails the run.
            opts.put("debezium-json.ignore-parse-errors", "false");
            opts.put("debezium-json.schema-include", "false");
        } else {
            opts.put("debezium-avro-confluent.url", a.registryUrl);
        }
        opts.putAll(a.extraOptions);

        StringBuilder ddl = new StringBuilder("CREATE TABLE src (\n  ");
        ddl.append(a.columns);
        ddl.append(",\n  PRIMARY KEY (");
        for (int i = 0; i < a.primaryKey.size(); i++) {
            ddl.append(i == 0 ? "" : ", ").append('`').append(a.primaryKey.get(i)).append('`');
        }
        ddl.append(") NOT ENFORCED\n) WITH (\n");
        int n = 0;
        for (Map.Entry<String, String> e : opts.entrySet()) {
            ddl.append(n++ == 0 ? "  " : ",\n  ")
                    .append(sqlString(e.getKey())).append(" = ").append(sqlString(e.getValue()));
        }
        ddl.append("\n)");
        if (System.getenv("WALRELAY_FLINK_HARNESS_DEBUG") != null) {
            System.err.println(ddl);
        }
        tEnv.executeSql(ddl.toString());

        TableResult result = tEnv.executeSql("SELECT * FROM src");
        ResolvedSchema schema = result.getResolvedSchema();
        List<Column> columns = schema.getColumns();
        int[] keyIdx = new int[a.primaryKey.size()];
        for (int i = 0; i < keyIdx.length; i++) {
            keyIdx[i] = schema.getColumnNames().indexOf(a.primaryKey.get(i));
            if (keyIdx[i] < 0) {
                throw new IllegalArgumentException("primary key column not among the columns: " + a.primaryKey.get(i));
            }
        }

        TreeMap<List<Object>, Row> table = new TreeMap<>(KEY_ORDER);
        long changes = 0;
        long missing = 0;
        try (CloseableIterator<Row> it = result.collect()) {
            while (it.hasNext()) {
                Row row = it.next();
                changes++;
                List<Object> key = new ArrayList<>(keyIdx.length);
                for (int i : keyIdx) {
                    key.add(row.getField(i));
                }
                RowKind kind = row.getKind();
                switch (kind) {
                    case INSERT, UPDATE_AFTER -> table.put(key, row);
                    case UPDATE_BEFORE, DELETE -> {
                        if (table.remove(key) == null) {
                            missing++;
                        }
                    }
                }
            }
        }
        if (missing > 0) {
            System.err.println("flink harness: note: " + missing
                    + " -U/-D row(s) had a key that was not in the table");
        }
        System.err.println("flink harness: " + changes + " changelog row(s) read");

        StringBuilder out = new StringBuilder();
        for (Row row : table.values()) {
            out.append('{');
            for (int i = 0; i < columns.size(); i++) {
                Column c = columns.get(i);
                if (i > 0) {
                    out.append(',');
                }
                jsonString(out, c.getName());
                out.append(':');
                jsonValue(out, row.getField(i), c.getDataType().getLogicalType());
            }
            out.append("}\n");
        }
        out.append("{\"rows\":").append(table.size()).append("}\n");
        System.out.print(out);
        System.out.flush();
    }

    private static String sqlString(String s) {
        return "'" + s.replace("'", "''") + "'";
    }

    // ------------------------------------------------------------- ordering

    @SuppressWarnings({"unchecked", "rawtypes"})
    private static final Comparator<List<Object>> KEY_ORDER = (x, y) -> {
        for (int i = 0; i < x.size(); i++) {
            Object p = x.get(i);
            Object q = y.get(i);
            int c;
            if (p == null || q == null) {
                c = p == null ? (q == null ? 0 : -1) : 1;
            } else if (p instanceof Comparable && p.getClass() == q.getClass()) {
                c = ((Comparable) p).compareTo(q);
            } else {
                c = String.valueOf(p).compareTo(String.valueOf(q));
            }
            if (c != 0) {
                return c;
            }
        }
        return 0;
    };

    // ----------------------------------------------------------------- JSON

    private static void jsonValue(StringBuilder out, Object v, LogicalType type) {
        if (v == null) {
            out.append("null");
        } else if (v instanceof Byte || v instanceof Short || v instanceof Integer || v instanceof Long
                || v instanceof Boolean) {
            out.append(v);
        } else if (v instanceof Float || v instanceof Double) {
            double d = ((Number) v).doubleValue();
            if (Double.isFinite(d)) {
                out.append(v);
            } else {
                jsonString(out, v.toString());
            }
        } else if (v instanceof BigDecimal b) {
            jsonString(out, b.toPlainString());
        } else if (v instanceof LocalDateTime t) {
            jsonString(out, formatTimestamp(t, precisionOf(type)));
        } else if (v instanceof Instant t) {
            jsonString(out, formatTimestamp(LocalDateTime.ofInstant(t, ZoneOffset.UTC), precisionOf(type)) + "Z");
        } else if (v instanceof LocalDate || v instanceof LocalTime) {
            jsonString(out, v.toString());
        } else if (v instanceof byte[] b) {
            jsonString(out, Base64.getEncoder().encodeToString(b));
        } else {
            jsonString(out, v.toString());
        }
    }

    private static int precisionOf(LogicalType type) {
        if (type instanceof TimestampType t) {
            return t.getPrecision();
        }
        if (type instanceof LocalZonedTimestampType t) {
            return t.getPrecision();
        }
        return 9;
    }

    private static final DateTimeFormatter SECONDS = DateTimeFormatter.ofPattern("uuuu-MM-dd'T'HH:mm:ss");

    /** ISO-8601 with exactly `precision` fractional digits (the column's). */
    private static String formatTimestamp(LocalDateTime t, int precision) {
        String s = SECONDS.format(t);
        if (precision <= 0) {
            return s;
        }
        String nanos = String.format("%09d", t.getNano());
        return s + "." + nanos.substring(0, Math.min(precision, 9));
    }

    private static void jsonString(StringBuilder out, String s) {
        out.append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                default -> {
                    // Non-ASCII escaped too: stdout is ASCII whatever the
                    // locale's encoding.
                    if (c < 0x20 || c > 0x7e) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        out.append('"');
    }
}
