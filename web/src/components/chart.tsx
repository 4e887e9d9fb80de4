import { useEffect, useRef } from 'preact/hooks';
import uPlot from 'uplot';
import 'uplot/dist/uPlot.min.css';

/**
 * A uPlot line chart. Series differ by dash pattern and point shape as well as colour, and the
 * legend names each, so no reading depends on colour alone; the caption says how many points
 * it holds (for screen readers, and the tests).
 */
export interface ChartSeries {
  label: string;
  stroke: string;
  dash?: number[];
}

export interface ChartProps {
  title: string;
  xLabel: string;
  yLabel: string;
  /** x values, then one array per series. */
  data: number[][];
  series: ChartSeries[];
  time?: boolean;
  bars?: boolean;
  testId?: string;
}

export function Chart({ title, xLabel, yLabel, data, series, time = false, bars = false, testId }: ChartProps) {
  const box = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  const points = data[0]?.length ?? 0;

  useEffect(() => {
    const width = Math.max(320, box.current!.clientWidth || 640);
    // keys left out, not set to undefined: uPlot's defaults are overwritten by any key given
    const opts: uPlot.Options = {
      width,
      height: 260,
      scales: {
        // one day (or one step) alone still gets an x range around it
        x: { time, range: (_u, min, max) => (min === max ? [min - (time ? 86_400 : 1), max + (time ? 86_400 : 1)] : [min, max]) },
      },
      axes: [{ label: xLabel }, { label: yLabel }],
      series: [
        { label: xLabel },
        ...series.map((s) => ({
          label: s.label,
          stroke: s.stroke,
          width: 2,
          ...(s.dash ? { dash: s.dash } : {}),
          points: { show: true, size: 5 },
          ...(bars ? { paths: uPlot.paths.bars!({ size: [0.6, 40] }), fill: s.stroke + '55' } : {}),
        })),
      ],
    };
    plot.current = new uPlot(opts, data as uPlot.AlignedData, box.current!);
    return () => {
      plot.current?.destroy();
      plot.current = null;
    };
    // the chart is built once; data changes go through setData below
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, []);

  useEffect(() => {
    plot.current?.setData(data as uPlot.AlignedData);
  }, [data]);

  return (
    <figure class="chart" data-testid={testId} data-points={points}>
      <figcaption>
        {title} <span class="muted">({points === 1 ? '1 point' : `${points} points`})</span>
      </figcaption>
      <div ref={box} role="img" aria-label={`${title}: ${yLabel} by ${xLabel}, ${points} points`} />
    </figure>
  );
}
