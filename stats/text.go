package stats

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
)

// metric is one Prometheus metric family of per-layer values.
type metric struct {
	name, typ, help string
	value           func(Layer) float64
}

var metrics = []metric{
	{"stargz_mount_layer_total_bytes", "gauge", "Compressed size of the layer's file data.", func(l Layer) float64 { return float64(l.TotalBytes) }},
	{"stargz_mount_layer_fetched_bytes", "gauge", "Compressed file data fetched and verified at least once.", func(l Layer) float64 { return float64(l.FetchedBytes) }},
	{"stargz_mount_layer_complete", "gauge", "1 when every chunk of the layer has been fetched.", func(l Layer) float64 { return b2f(l.Complete) }},
	{"stargz_mount_layer_memory_hits_total", "counter", "Chunk lookups served by the memory cache.", func(l Layer) float64 { return float64(l.MemoryHits) }},
	{"stargz_mount_layer_memory_misses_total", "counter", "Chunk lookups the memory cache could not serve.", func(l Layer) float64 { return float64(l.MemoryMisses) }},
	{"stargz_mount_layer_disk_hits_total", "counter", "Chunk lookups served by the disk cache.", func(l Layer) float64 { return float64(l.DiskHits) }},
	{"stargz_mount_layer_disk_misses_total", "counter", "Chunk lookups the disk cache could not serve.", func(l Layer) float64 { return float64(l.DiskMisses) }},
	{"stargz_mount_layer_requests_total", "counter", "HTTP requests for the layer blob.", func(l Layer) float64 { return float64(l.Requests) }},
	{"stargz_mount_layer_transferred_bytes_total", "counter", "Body bytes received for the layer blob.", func(l Layer) float64 { return float64(l.TransferredBytes) }},
	{"stargz_mount_layer_retries_total", "counter", "Retried HTTP requests for the layer blob.", func(l Layer) float64 { return float64(l.Retries) }},
	{"stargz_mount_layer_errors_total", "counter", "Failed HTTP requests for the layer blob.", func(l Layer) float64 { return float64(l.Errors) }},
	{"stargz_mount_layer_files_saved_total", "counter", "Files saved whole in the disk cache for FUSE passthrough.", func(l Layer) float64 { return float64(l.FilesSaved) }},
	{"stargz_mount_layer_passthrough_opens_total", "counter", "Opens the kernel served from a saved file itself (FUSE passthrough).", func(l Layer) float64 { return float64(l.PassthroughOpens) }},
	{"stargz_mount_layer_prefetch_bytes", "gauge", "Size of the layer's prioritized region.", func(l Layer) float64 { return float64(l.PrefetchBytes) }},
	{"stargz_mount_layer_borrowed", "gauge", "1 when another process serves the layer (a shared layer mount); its reads are counted there.", func(l Layer) float64 { return b2f(l.Borrowed) }},
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// WriteMetrics writes s in the Prometheus text exposition format.
func WriteMetrics(w io.Writer, s Snapshot) error {
	var b strings.Builder
	for _, m := range metrics {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", m.name, m.help, m.name, m.typ)
		for _, l := range s.Layers {
			fmt.Fprintf(&b, "%s{mountpoint=%s,layer=%s} %s\n", m.name, quote(s.Mountpoint), quote(l.Digest),
				strconv.FormatFloat(m.value(l), 'g', -1, 64))
		}
	}
	b.WriteString("# HELP stargz_mount_layer_background Background fetch state of the layer (1 for the current state).\n# TYPE stargz_mount_layer_background gauge\n")
	for _, l := range s.Layers {
		fmt.Fprintf(&b, "stargz_mount_layer_background{mountpoint=%s,layer=%s,state=%s} 1\n", quote(s.Mountpoint), quote(l.Digest), quote(l.Background))
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// quote makes a Prometheus label value: backslash, quote and newline
// escaped.
func quote(s string) string {
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(s) + `"`
}

// WriteTable writes s as a table for people.
func WriteTable(w io.Writer, s Snapshot) error {
	fmt.Fprintf(w, "Mount:  %s\nImage:  %s\n\n", s.Mountpoint, s.Ref)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "#\tLAYER\tFETCHED\tCOMPLETE\tMEM HIT/MISS\tDISK HIT/MISS\tREQUESTS\tRETRIES\tERRORS\tPREFETCH\tBACKGROUND")
	var total, fetched int64
	borrowed := 0
	for i, l := range s.Layers {
		if l.Borrowed {
			// Its reads are another process's: nothing to count here.
			borrowed++
			by := "another process"
			if l.ServerPID > 0 {
				by = "pid " + strconv.Itoa(l.ServerPID)
			}
			fmt.Fprintf(tw, "%d\t%s\tshared, served by %s\t-\t-\t-\t-\t-\t-\t-\t-\n", i, short(l.Digest), by)
			continue
		}
		total += l.TotalBytes
		fetched += l.FetchedBytes
		fmt.Fprintf(tw, "%d\t%s\t%s of %s (%s)\t%s\t%d/%d\t%d/%d\t%d\t%d\t%d\t%s\t%s\n", i, short(l.Digest),
			size(l.FetchedBytes), size(l.TotalBytes), percent(l.FetchedBytes, l.TotalBytes), yesNo(l.Complete),
			l.MemoryHits, l.MemoryMisses, l.DiskHits, l.DiskMisses, l.Requests, l.Retries, l.Errors,
			l.Prefetch, l.Background)
	}
	tw.Flush()
	_, err := fmt.Fprintf(w, "\nFetched %s of %s (%s)\n", size(fetched), size(total), percent(fetched, total))
	if err == nil && borrowed > 0 {
		_, err = fmt.Fprintf(w, "%d shared layer(s) served by another process: see its stats\n", borrowed)
	}
	return err
}

func percent(a, b int64) string {
	if b == 0 {
		return "100%"
	}
	return strconv.FormatFloat(float64(a)*100/float64(b), 'f', 1, 64) + "%"
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func short(d string) string {
	if _, hex, ok := strings.Cut(d, ":"); ok && len(hex) > 12 {
		return d[:len(d)-len(hex)] + hex[:12]
	}
	return d
}

// size formats n bytes with a binary unit.
func size(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + " B"
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return strconv.FormatFloat(float64(n)/float64(div), 'f', 1, 64) + " " + string("KMGTP"[exp]) + "iB"
}
